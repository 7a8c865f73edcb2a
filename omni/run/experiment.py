"""Experiment files: what `omni run EXPERIMENT.yaml` reads, checked before anything runs.

    name: smoke
    notebook: notebooks/01_smoke.ipynb
    parameters: {steps: 50, layer: last}
    grid: {seed: [0, 1, 2]}              # optional: the product of these axes ...
    points: [{k: 4}, {k: 8, projector: conv}]   # ... times these listed points (each a set of values)
    summary: notebooks/05_ablation_report.ipynb  # optional, grids only: run last, logging into the parent run
    headline: [final_loss, passed]       # metrics shown in reports/index.html

Design choices:
- The YAML's shape, every parameter's name (against the notebook's `parameters` cell) and, where the
  notebook names its config dataclass, every value's type and range (omni.params) are checked for
  every grid point before a kernel starts; a bad one is one line naming it and what it may be.
- `-p NAME=VALUE` and papermill's `-p NAME VALUE` both work; VALUE is YAML, and a list makes a grid axis.
- A grid is the product of its axes times its listed points, so no notebook needs an override
  language of its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omni import params

RESERVED = tuple(params.RESERVED)  # filled in by the runner, declared by every notebook
KEYS = {"name", "notebook", "parameters", "grid", "points", "headline", "summary", "description"}


class ExperimentError(ValueError):
    pass


@dataclass
class Experiment:
    name: str
    notebook: Path
    parameters: dict[str, Any]
    grid: dict[str, list]
    points: list[dict[str, Any]]
    headline: list[str]
    summary: Path | None
    source: Path
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)  # the notebook's parameters cell


def read_notebook(path: Path):
    import jupytext
    import nbformat

    if path.suffix == ".ipynb":
        return nbformat.read(path, as_version=4)
    return jupytext.read(path)


def notebook_parameters(path: Path) -> dict[str, Any]:
    """Defaults from the cell tagged `parameters`, evaluated in an empty namespace."""
    nb = read_notebook(path)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ExperimentError(f"{path}: no cell tagged `parameters` (add `# %% tags=[\"parameters\"]`)")
    ns: dict[str, Any] = {}
    exec(compile(cells[0].source, f"{path}:parameters", "exec"), {}, ns)
    missing = [r for r in RESERVED if r not in ns]
    if missing:
        raise ExperimentError(f"{path}: the parameters cell must declare {missing}")
    return {k: v for k, v in ns.items() if not k.startswith("_")}


def parse_overrides(items: list[str] | list[list[str]]) -> dict[str, Any]:
    """`-p NAME=VALUE` or papermill's `-p NAME VALUE`; VALUE is YAML (a list makes a grid axis)."""
    out = {}
    for item in items:
        words = [item] if isinstance(item, str) else list(item)
        if len(words) == 1 and "=" in words[0]:
            words = words[0].split("=", 1)
        if len(words) != 2 or not words[0].strip():
            raise ExperimentError(f"-p {' '.join(words)!r}: expected NAME=VALUE or NAME VALUE")
        key, value = words
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ExperimentError(f"-p {key}: value {value!r} is not valid YAML: {e}") from e
    return out


def _shape(path: Path, spec: Any) -> None:
    """Refuse a malformed experiment file in one line, before anything runs."""
    if not isinstance(spec, dict):
        raise ExperimentError(f"{path}: expected a mapping of keys {sorted(KEYS)}, got {type(spec).__name__}")
    unknown = set(spec) - KEYS
    if unknown:
        raise ExperimentError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(KEYS)}")
    if not isinstance(spec.get("notebook"), str):
        raise ExperimentError(f"{path}: missing `notebook` (a path to an .ipynb)")
    if not isinstance(spec.get("parameters") or {}, dict):
        raise ExperimentError(f"{path}: `parameters` must be a mapping NAME: VALUE")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ExperimentError(f"{path}: `grid` must be a mapping NAME: [VALUE, ...]")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ExperimentError(f"{path}: grid axis `{k}` must be a non-empty list, got {v!r}")
    points = spec.get("points")
    if points is not None and (not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points)):
        raise ExperimentError(f"{path}: `points` must be a non-empty list of mappings NAME: VALUE")
    headline = spec.get("headline") or []
    if not isinstance(headline, list) or not all(isinstance(h, str) for h in headline):
        raise ExperimentError(f"{path}: `headline` must be a list of metric names")


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    path = Path(path)
    if not path.exists():
        raise ExperimentError(f"{path}: no such experiment file")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML: {e}") from e
    _shape(path, spec)
    notebook = Path(spec["notebook"])
    if not notebook.exists():
        raise ExperimentError(f"{path}: notebook {notebook} does not exist (paths are relative to the working directory)")
    defaults = notebook_parameters(notebook)
    exp_params = dict(spec.get("parameters") or {})
    grid = {k: list(v) for k, v in (spec.get("grid") or {}).items()}
    points = [dict(p) for p in spec.get("points") or []]
    found = params.notebook_config(read_notebook(notebook))
    if found is not None:  # a renamed parameter's old name still works (params.aliases), with a note
        try:
            exp_params = params.rename_aliases(found[0], exp_params, f"{path} parameters")
            grid = params.rename_aliases(found[0], grid, f"{path} grid")
            points = [params.rename_aliases(found[0], p, f"{path} points[{i}]") for i, p in enumerate(points)]
            overrides = params.rename_aliases(found[0], overrides or {}, "-p")
        except params.ParamError as e:
            raise ExperimentError(str(e)) from None
    named = [(f"{path} parameters", exp_params), (f"{path} grid", grid), ("-p", overrides or {})]
    named += [(f"{path} points[{i}]", p) for i, p in enumerate(points)]
    for where, names in named:
        bad = [n for n in names if n not in defaults or n in RESERVED]
        if bad:
            valid = [k for k in defaults if k not in RESERVED]
            raise ExperimentError(f"{where}: unknown parameter {bad[0]!r}{params.did_you_mean(bad[0], valid)} for {notebook}; "
                                  f"valid: {', '.join(valid)}")
    for k, v in (overrides or {}).items():
        # a list override makes (or replaces) a grid axis; a scalar fixes the value
        if isinstance(v, list):
            if not v:
                raise ExperimentError(f"-p {k}: an empty list makes an empty grid")
            grid[k] = v
            exp_params.pop(k, None)
        else:
            exp_params[k] = v
            grid.pop(k, None)
            for p in points:
                p.pop(k, None)
    summary = Path(spec["summary"]) if spec.get("summary") else None
    if summary is not None and not summary.exists():
        raise ExperimentError(f"{path}: summary notebook {summary} does not exist")
    return Experiment(
        name=str(spec.get("name") or path.stem),
        notebook=notebook,
        parameters=exp_params,
        grid=grid,
        points=points,
        headline=list(spec.get("headline") or []),
        summary=summary,
        source=path,
        description=str(spec.get("description") or ""),
        defaults=defaults,
    )


def grid_points(exp: Experiment) -> list[dict[str, Any]]:
    """The product of the grid axes, times the listed points (each overriding what it names)."""
    product = [dict(zip(exp.grid, combo)) for combo in itertools.product(*exp.grid.values())] or [{}]
    listed = exp.points or [{}]
    return [dict(exp.parameters) | g | p for p in listed for g in product]


def varying(exp: Experiment) -> list[str]:
    """The parameters that differ between grid points: they name each point's folder."""
    keys = list(exp.grid) + [k for p in exp.points for k in p]
    return list(dict.fromkeys(keys))


def checked_params(exp: Experiment, point: dict[str, Any], found: tuple[type, tuple[str, ...]] | None) -> dict[str, Any]:
    """Every effective parameter of one point (defaults included), checked by the notebook's config
    (`found`: params.notebook_config) when it names one. Raises ExperimentError naming the parameter."""
    values = {k: v for k, v in exp.defaults.items() if k not in RESERVED} | point
    if found is None:
        return values
    cls, derived = found
    try:
        cfg = params.check(cls, values, derived)
    except (ValueError, TypeError) as e:  # ParamError, and the ValueErrors of a config's own checks
        where = ", ".join(f"{k}={point[k]}" for k in varying(exp) if k in point)
        raise ExperimentError(f"{exp.source}{' [' + where + ']' if where else ''}: {e}") from e
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in derived}


def slug(point: dict[str, Any], keys: list[str]) -> str:
    """A grid point's folder and run-name suffix: `layer=last-seed=0`, made file-name safe."""
    s = "-".join(f"{k}={point[k]}" for k in keys if k in point)
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s)
