"""`omni run EXPERIMENT.yaml`: papermill -> executed notebook -> code-free HTML -> reports/index.html.

An experiment file names a notebook, its parameters, and optionally a grid:

    name: smoke
    notebook: notebooks/01_smoke.py      # jupytext percent file (or .ipynb)
    parameters: {steps: 50, layer: last}
    grid: {seed: [0, 1, 2]}              # optional: one child run per combination, under a parent run
    summary: notebooks/04_compare.py     # optional, grids only: run last, logging into the parent run
    headline: [final_loss, passed]       # metrics shown in reports/index.html

Design choices:
- Parameters are validated against the notebook's own `parameters` cell before anything runs:
  an unknown name (in the YAML or in a `-p` override) is an error that names it.
- The runner owns each MLflow run (see omni.track); the notebook receives `mlflow_run_id` and
  `out_dir`, and every notebook declares both in its parameters cell.
- A failed notebook still gets its executed copy, its HTML (showing the error) and its index
  entry marked failed; the other grid points go on; the exit code is non-zero.
- Grid points run one after another, or in `workers` threads: each point is a separate kernel
  process, so threads only wait; torch threads are split between workers.
"""

from __future__ import annotations

import datetime as dt
import html
import itertools
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omni import track

RESERVED = ("mlflow_run_id", "out_dir")  # filled in by the runner, declared by every notebook


class ExperimentError(ValueError):
    pass


@dataclass
class Experiment:
    name: str
    notebook: Path
    parameters: dict[str, Any]
    grid: dict[str, list]
    headline: list[str]
    summary: Path | None
    source: Path
    description: str = ""


@dataclass
class RunResult:
    name: str
    status: str  # FINISHED | FAILED
    run_id: str
    report_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ExperimentError(f"-p {item!r}: expected NAME=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    path = Path(path)
    if not path.exists():
        raise ExperimentError(f"{path}: no such experiment file")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML: {e}") from e
    unknown_keys = set(spec) - {"name", "notebook", "parameters", "grid", "headline", "summary", "description"}
    if unknown_keys:
        raise ExperimentError(f"{path}: unknown keys {sorted(unknown_keys)}")
    if "notebook" not in spec:
        raise ExperimentError(f"{path}: missing `notebook`")
    notebook = Path(spec["notebook"])
    if not notebook.exists():
        raise ExperimentError(f"{path}: notebook {notebook} does not exist (paths are relative to the working directory)")
    defaults = notebook_parameters(notebook)
    params = dict(spec.get("parameters") or {})
    grid = {k: list(v) for k, v in (spec.get("grid") or {}).items()}
    for where, names in ((f"{path} parameters", params), (f"{path} grid", grid), ("-p", overrides or {})):
        bad = [n for n in names if n not in defaults or n in RESERVED]
        if bad:
            valid = ", ".join(k for k in defaults if k not in RESERVED)
            raise ExperimentError(f"{where}: unknown parameter {bad[0]!r} for {notebook}; valid: {valid}")
    for k, v in (overrides or {}).items():
        # a list override makes (or replaces) a grid axis; a scalar fixes the value
        if isinstance(v, list):
            grid[k] = v
            params.pop(k, None)
        else:
            params[k] = v
            grid.pop(k, None)
    summary = Path(spec["summary"]) if spec.get("summary") else None
    if summary is not None and not summary.exists():
        raise ExperimentError(f"{path}: summary notebook {summary} does not exist")
    return Experiment(
        name=str(spec.get("name") or path.stem),
        notebook=notebook,
        parameters=params,
        grid=grid,
        headline=list(spec.get("headline") or []),
        summary=summary,
        source=path,
        description=str(spec.get("description") or ""),
    )


def grid_points(exp: Experiment) -> list[dict[str, Any]]:
    if not exp.grid:
        return [dict(exp.parameters)]
    keys = list(exp.grid)
    return [dict(exp.parameters) | dict(zip(keys, combo)) for combo in itertools.product(*exp.grid.values())]


def _slug(params: dict[str, Any], keys: list[str]) -> str:
    s = "-".join(f"{k}={params[k]}" for k in keys)
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s)


def execute(notebook: Path, params: dict[str, Any], out_dir: Path, run_id: str, headline: list[str], meta: dict) -> RunResult:
    """Run one notebook into out_dir; never raises for a notebook failure."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / "notebook.ipynb"
    error = ""
    try:
        pm.execute_notebook(
            read_notebook(notebook),
            str(executed),
            parameters=params | {"mlflow_run_id": run_id, "out_dir": str(out_dir)},
            kernel_name="python3",
            language="python",
            cwd=os.getcwd(),
            progress_bar=sys.stderr.isatty(),
        )
        status = "FINISHED"
    except Exception as e:  # papermill's execution error, a dead kernel, ...
        status = "FAILED"
        error = _last_line(str(e))
    report = out_dir / "report.html"
    if executed.exists():
        _to_html(executed, report)
    metrics = {}
    if run_id:
        for path in (executed, report):
            if path.exists():
                track.Tracker(run_id).log_artifact(path)
        metrics = track.run_metrics(run_id)
        track.end_run(run_id, status)
    result = RunResult(meta["run_name"], status, run_id, out_dir, metrics, error)
    summary = {
        **meta,
        "status": status,
        "error": error,
        "run_id": run_id,
        "params": {k: params[k] for k in params},
        "headline": {k: metrics[k] for k in headline if k in metrics},
        "html": "report.html" if report.exists() else "",
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return result


def _last_line(text: str) -> str:
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "failed"


def _to_html(executed: Path, report: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    report.write_text(body)


def run_experiment(path: str | Path, overrides: dict[str, Any] | None = None, reports: str | Path = "reports", workers: int = 1) -> list[RunResult]:
    exp = load_experiment(path, overrides)
    reports = Path(reports)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    points = grid_points(exp)
    os.environ.setdefault("MLFLOW_TRACKING_URI", track.tracking_uri())  # the kernels inherit it
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "omni" / "numba"))
    track.experiment_id(exp.name)  # create once, before any parallel worker
    base = {"experiment": exp.name, "source": str(exp.source), "notebook": str(exp.notebook), "description": exp.description}
    parent = ""
    if exp.grid:
        parent = track.start_run(exp.name, f"{exp.name}-{stamp}", params=exp.parameters | {"grid": json.dumps(exp.grid)})
    keys = list(exp.grid)

    def one(params: dict[str, Any]) -> RunResult:
        suffix = _slug(params, keys) if keys else ""
        run_name = f"{exp.name}-{stamp}" + (f"-{suffix}" if suffix else "")
        run_id = track.start_run(exp.name, run_name, params=params, parent_run_id=parent or None)
        out = reports / exp.name / stamp / suffix if suffix else reports / exp.name / stamp
        meta = base | {"run_name": run_name, "parent_run_id": parent, "started": stamp}
        return execute(exp.notebook, params, out, run_id, exp.headline, meta)

    if workers > 1 and len(points) > 1:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // workers))
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, points))
    else:
        results = [one(p) for p in points]

    if parent:
        status = "FINISHED" if all(r.status == "FINISHED" for r in results) else "FAILED"
        if exp.summary is not None:
            # the summary notebook logs into the parent run and reads its children from there
            meta = base | {"run_name": f"{exp.name}-{stamp}", "parent_run_id": "", "started": stamp, "grid_parent": True}
            summary = execute(exp.summary, {}, reports / exp.name / stamp, parent, exp.headline, meta)
            results.append(summary)
            status = "FINISHED" if status == "FINISHED" and summary.status == "FINISHED" else "FAILED"
        track.end_run(parent, status)  # a failed child fails the parent, whatever the summary did
    write_index(reports)
    return results


def write_index(reports: str | Path) -> Path:
    """reports/index.html: every report with its status and headline metrics, newest first."""
    reports = Path(reports)
    rows = []
    for f in sorted(reports.glob("**/summary.json")):
        try:
            s = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        s["_dir"] = f.parent.relative_to(reports).as_posix()
        rows.append(s)
    rows.sort(key=lambda s: (s.get("started", ""), s.get("grid_parent", False), s.get("run_name", "")), reverse=True)
    body = []
    for s in rows:
        link = f'<a href="{html.escape(s["_dir"])}/{s["html"]}">{html.escape(s["run_name"])}</a>' if s.get("html") else html.escape(s["run_name"])
        metrics = ", ".join(f"{html.escape(k)}={_fmt(v)}" for k, v in s.get("headline", {}).items())
        params = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}" for k, v in s.get("params", {}).items())
        cls = "ok" if s.get("status") == "FINISHED" else "fail"
        err = f'<div class="err">{html.escape(s.get("error", ""))}</div>' if s.get("error") else ""
        kind = "grid" if s.get("grid_parent") else ("child" if s.get("parent_run_id") else "")
        body.append(
            f'<tr class="{kind}"><td>{html.escape(s.get("experiment", ""))}</td><td>{link}</td>'
            f'<td class="{cls}">{html.escape(s.get("status", ""))}{err}</td><td>{metrics}</td>'
            f'<td class="p">{params}</td><td>{html.escape(s.get("finished", ""))}</td></tr>'
        )
    loose = sorted(p.name for p in reports.glob("*.html") if p.name != "index.html")  # e.g. the corpus datasheet
    others = "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>' for n in loose)
    others = f"<h2>Other reports</h2><ul>{others}</ul>" if others else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>omni reports</title><style>
body{{font-family:system-ui,sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}}
.ok{{color:#197a2b}} .fail{{color:#b00020;font-weight:bold}} .err{{font-weight:normal;font-size:85%}}
.p{{font-size:80%;color:#555;max-width:30em}} tr.child td:nth-child(2){{padding-left:2em}} tr.grid{{background:#f4f6fa}}
</style></head><body><h1>omni reports</h1><p>{len(rows)} reports; MLflow: <code>{html.escape(track.tracking_uri())}</code></p>
<table><tr><th>experiment</th><th>report</th><th>status</th><th>headline</th><th>parameters</th><th>finished</th></tr>
{''.join(body)}</table>{others}</body></html>"""
    reports.mkdir(parents=True, exist_ok=True)
    out = reports / "index.html"
    out.write_text(page)
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))
