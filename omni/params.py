"""Run parameters: the experiment's dataclass is the one source of its parameters.

A notebook's `parameters` cell is *generated* from its config dataclass (names, types, defaults and
the field comments as one-line help), so papermill's `--help-notebook` lists typed parameters and
nothing is typed twice. The notebook then builds its config with `from_params(Config, globals())`.
`omni run` builds the same config from the same values before any kernel starts, so a wrong type or
an out-of-range value is refused in one line naming the parameter.

    python -m omni.params            # rewrite every notebook's parameters cell from its dataclass
    python -m omni.params --check    # exit 1 if a cell is out of date (a test runs this)

Design choices:
- The notebook names its config class in its metadata (`"omni": {"config": "omni.experiments.smoke.SmokeConfig"}`);
  fields a notebook derives itself (e.g. the checkpoint folder under `out_dir`) are listed under
  `"derived"` and are not parameters.
- Values are coerced by the field's annotation the way a YAML or command-line value would be written
  (an int for a float field, a number for a str field such as `layer: 2`); anything else is an error.
- Ranges live in each config's `__post_init__` (via `require`), so a config built in Python is checked too.
- Two names are reserved in every notebook: `mlflow_run_id` (the run to log into; "" starts one) and
  `out_dir` (where the run writes its files).
- A renamed field keeps its old name working for one release: the config lists it in its `ALIASES`
  ClassVar ({old: new}); a value given under the old name (YAML, `-p`, papermill) sets the new field,
  with a note on stderr, and MLflow logs the new name.
- Notebooks are committed exactly as JupyterLab saves them (the kernelspec and language_info that the
  kernel reports, no outputs), so opening one changes nothing and leaves `git status` clean. The one
  field that depends on who opens it, the Python patch version in language_info, is kept as committed
  by `pre_save_hook`, which `make setup` installs into this environment's Jupyter server
  (notebooks/jupyter_server_config.json). tests/test_params.py saves each pair the way JupyterLab does.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Mapping

RESERVED = {
    "mlflow_run_id": "MLflow run to log into; empty: start a new run in the default store",
    "out_dir": "folder this run writes its files into",
}
GENERATED = "# generated from {cls} by `python -m omni.params`: edit the dataclass, not this cell"


class ParamError(ValueError):
    """A parameter's name, type or value is wrong; the message names it."""


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise ParamError naming `name` unless `ok`: `require(steps >= 1, "steps", steps, ">= 1")`."""
    if not ok:
        raise ParamError(f"parameter `{name}` = {value!r}: must be {allowed}")


def require_choice(name: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    require(value in choices, name, value, "one of " + ", ".join(map(str, choices)))


def require_device(device: str) -> None:
    """auto | cpu | cuda[:N], and cuda only where CUDA is there: refused before any work starts."""
    require(device in ("auto", "cpu") or device.startswith("cuda"), "device", device, "auto, cpu or cuda[:N]")
    if device.startswith("cuda"):
        import torch

        require(torch.cuda.is_available(), "device", device, "auto or cpu: CUDA is not available on this machine")


def config_class(path: str) -> type:
    """`omni.experiments.alignment.AlignConfig` -> the class."""
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ParamError(f"config class {path!r} not found: {e}") from e
    if not dataclasses.is_dataclass(cls):
        raise ParamError(f"{path} is not a dataclass")
    return cls


def _base_type(annotation: Any) -> type:
    hint = eval(annotation, vars(sys.modules["builtins"])) if isinstance(annotation, str) else annotation
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    return typing.get_origin(hint) or hint


def type_name(cls: type, name: str) -> str:
    return _base_type({f.name: f.type for f in dataclasses.fields(cls)}[name]).__name__


def coerce(cls: type, name: str, value: Any) -> Any:
    """`value` as the type of field `name` of `cls`, or ParamError."""
    want = _base_type({f.name: f.type for f in dataclasses.fields(cls)}[name])
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `layer: 2` in YAML
    elif want is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    else:
        return value
    raise ParamError(f"parameter `{name}` = {value!r}: expected {want.__name__}")


def did_you_mean(name: str, valid: typing.Iterable[str]) -> str:
    """" (did you mean `steps`?)" for a near-miss of a valid name, else ""."""
    import difflib

    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def aliases(cls: type) -> dict[str, str]:
    """{old name: new name} of the fields `cls` renamed (its ALIASES), accepted until the next release."""
    return dict(getattr(cls, "ALIASES", {}))


def note_alias(old: str, new: str) -> None:
    print(f"note: parameter `{old}` is now `{new}`; the old name goes in the next release", file=sys.stderr)


def rename_aliases(cls: type, values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """`values` under the new names: each old name (aliases) becomes its new one, with a note; a value
    given under both names is refused (which one was meant?)."""
    out = dict(values)
    for old, new in aliases(cls).items():
        if old in out:
            if new in out:
                raise ParamError(f"{where + ': ' if where else ''}parameter `{old}` is the old name of `{new}`: give one of them")
            note_alias(old, new)
            out[new] = out.pop(old)
    return out


def from_params(cls: type, namespace: Mapping[str, Any], **derived: Any):
    """Build config `cls` from every field that `namespace` (a notebook's `globals()`) defines.
    `derived` sets fields the notebook computes itself. Ranges are checked by the config itself.
    An old name (aliases) in `namespace` was injected by papermill: its value wins over the new
    name's, which the parameters cell always defines."""
    namespace = dict(namespace)
    for old, new in aliases(cls).items():
        if old in namespace:
            note_alias(old, new)
            namespace[new] = namespace.pop(old)
    kwargs = {f.name: coerce(cls, f.name, namespace[f.name]) for f in dataclasses.fields(cls) if f.name in namespace}
    return cls(**(kwargs | derived))


def check(cls: type, values: Mapping[str, Any], derived: typing.Iterable[str] = ()) -> Any:
    """What `omni run` does before a kernel starts: unknown names, types and ranges of `values`."""
    values = rename_aliases(cls, values)
    names = {f.name for f in dataclasses.fields(cls)} - set(derived)
    unknown = [k for k in values if k not in names and k not in RESERVED]
    if unknown:
        raise ParamError(f"unknown parameter {unknown[0]!r}{did_you_mean(unknown[0], names)}; valid: {', '.join(sorted(names))}")
    return from_params(cls, {k: v for k, v in values.items() if k not in RESERVED})


def field_help(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the class source: the one-line help of its parameter."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        src = inspect.getsource(klass)
        lines = src.splitlines()
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                line = lines[tok.start[0] - 1]
                head = line[: tok.start[1]].strip()
                if ":" in head and head.split(":")[0].strip().isidentifier():
                    out[head.split(":")[0].strip()] = tok.string.lstrip("#").strip()
    return out


def parameters_cell(cls: type, experiment: str, derived: typing.Iterable[str] = ()) -> str:
    """The source of a notebook's parameters cell for config `cls`."""
    helps = field_help(cls)
    lines = [GENERATED.format(cls=f"{cls.__module__}.{cls.__name__}")]
    for f in dataclasses.fields(cls):
        if f.name in derived:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # papermill's parser skips a line holding a second '=': keep help text free of it
        help_ = helps.get(f.name, "").replace("=", ":")
        lines.append(f"{f.name}: {type_name(cls, f.name)} = {default!r}" + (f"  # {help_}" if help_ else ""))
    lines.append(f'mlflow_run_id: str = ""  # {RESERVED["mlflow_run_id"]}')
    lines.append(f'out_dir: str = "reports/{experiment}/adhoc"  # {RESERVED["out_dir"]}')
    return "\n".join(lines)


def notebook_config(nb) -> tuple[type, tuple[str, ...]] | None:
    """(config class, derived fields) named in a notebook's metadata, or None."""
    meta = nb.metadata.get("omni", {})
    if "config" not in meta:
        return None
    return config_class(meta["config"]), tuple(meta.get("derived", ()))


def sync_notebook(path: Path, write: bool) -> bool:
    """Regenerate the parameters cell of an .ipynb from its config; True when it was out of date."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    found = notebook_config(nb)
    if found is None:
        return False
    cls, derived = found
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ParamError(f"{path}: no cell tagged `parameters`")
    want = parameters_cell(cls, nb.metadata["omni"].get("experiment", path.stem.split("_", 1)[-1]), derived)
    stale = cells[0].source != want
    if stale and write:
        import jupytext

        cells[0].source = want
        nbformat.write(nb, path)
        if path.with_suffix(".py").exists():  # keep the paired percent file (what diffs show) in step
            jupytext.write(nb, path.with_suffix(".py"), fmt="py:percent")
    return stale


def kernel_metadata() -> dict[str, Any]:
    """The notebook metadata JupyterLab writes on opening a notebook with this environment's `python3`
    kernel: the kernelspec (name, display name, language) and the kernel's language_info."""
    from ipykernel.ipkernel import IPythonKernel
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    return {"kernelspec": {"display_name": spec.display_name, "language": spec.language, "name": "python3"},
            "language_info": dict(IPythonKernel.language_info)}


def pre_save_hook(model: dict, path: str, contents_manager: Any, **kwargs: Any) -> None:
    """Jupyter server's ContentsManager.pre_save_hook: a notebook whose language_info differs from the
    file on disk only in the Python version (3.11.7 committed, 3.12.1 here) keeps the committed version,
    so a notebook opened with another patch release of Python is not rewritten for that alone."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    info = model["content"].get("metadata", {}).get("language_info")
    if not isinstance(info, dict) or "version" not in info:
        return
    import json

    try:
        on_disk = json.loads((Path(contents_manager.root_dir) / path).read_text())["metadata"]["language_info"]
    except (OSError, ValueError, KeyError, TypeError):  # a new notebook, or not one
        return
    if isinstance(on_disk, dict) and "version" in on_disk:
        if {k: v for k, v in info.items() if k != "version"} == {k: v for k, v in on_disk.items() if k != "version"}:
            info["version"] = on_disk["version"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omni.params", description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", default=sorted(str(p) for p in Path("notebooks").glob("*.ipynb")))
    p.add_argument("--check", action="store_true", help="only report out-of-date cells; exit 1 if any")
    args = p.parse_args(argv)
    stale = [n for n in args.notebooks if sync_notebook(Path(n), write=not args.check)]
    for n in stale:
        print(f"{n}: parameters cell {'out of date' if args.check else 'rewritten'}")
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
