"""`omni run`: papermill -> executed notebook -> code-free HTML -> reports/index.html, one MLflow run each.

Design choices:
- Everything is checked before a kernel starts (omni.run.experiment): a bad value never costs a run.
- The runner owns each MLflow run (see omni.track); the notebook receives `mlflow_run_id` and
  `out_dir`. The run's params are the config's fields, defaults included, under their own names.
- Report folders are created exclusively (a second run in the same second gets `-2`), and each
  holds a summary.json from the start (status RUNNING, pid, host), so a killed run is found later
  (omni.run.index marks it KILLED) and can be resumed: `--resume FOLDER|RUN_ID` runs the same notebook
  with the same parameters, run id and folder, and the training loop picks up its checkpoints there.
  Resuming a grid reruns only the points that did not finish.
- A failed notebook still gets its executed copy, its HTML (showing the error) and its index
  entry marked failed; the other grid points go on; the exit code is non-zero.
- Grid points run one after another, or in `workers` threads: each point is a separate kernel
  process, so threads only wait; torch threads are split between workers.
- A report is read after the fact, maybe offline: no progress bars in it (TQDM_DISABLE, which every
  bar of omni obeys: omni.common.progress), and nothing loaded from a CDN (nbconvert's template asks
  for require.js, MathJax and mermaid; no notebook here uses them). The executed notebook is logged to
  MLflow beside the report as HTML too (with its code), since MLflow shows an .ipynb as raw JSON.
- The kernels talk to papermill over CurveZMQ-encrypted TCP (ipykernel declares it; the kernel warns
  on every start without it), or over IPC sockets where pyzmq has no Curve.
- reports/index.html is rebuilt when a run starts and when it ends, so a run in progress is listed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import html
import itertools
import json
import os
import re
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


from omni import params, track
from omni.common import DISK_FULL, atomic_write, disk_full
from omni.run import index
from omni.run.experiment import ExperimentError, checked_params, grid_points, load_experiment, read_notebook, slug, varying

@dataclass
class RunResult:
    name: str
    status: str  # FINISHED | FAILED
    run_id: str
    report_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


def new_report_dir(parent: Path, stamp: str) -> Path:
    """reports/<experiment>/<stamp>, created exclusively: two runs in the same second never share one."""
    parent.mkdir(parents=True, exist_ok=True)
    for i in itertools.count(1):
        d = parent / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def write_summary(out_dir: Path, summary: dict) -> None:
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))


def kernel_config():
    """papermill's kernel manager set up so that the kernel has nothing to warn about: Curve keys
    provisioned by the manager (ipykernel's kernelspec declares support), or IPC without Curve."""
    import zmq
    from traitlets.config import Config

    return Config({"KernelManager": {"transport_encryption": "auto"} if zmq.has("curve") else {"transport": "ipc"}})


def execute(notebook: Path, values: dict[str, Any], out_dir: Path, run_id: str, headline: list[str], meta: dict,
            reports: Path | None = None) -> RunResult:
    """Run one notebook into out_dir; never raises for a notebook failure. `reports`: the index to
    rebuild when the run starts and ends."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / "notebook.ipynb"
    experiment_id = track.client().get_run(run_id).info.experiment_id if run_id else ""
    summary = {
        **meta,
        "status": "RUNNING",
        "error": "",
        "run_id": run_id,
        "experiment_id": experiment_id,
        "params": values,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "mlflow_url": track.run_url(run_id, experiment_id) if run_id else "",
    }
    write_summary(out_dir, summary)
    if reports is not None:
        index.write_index(reports)
    error = ""
    try:
        pm.execute_notebook(
            read_notebook(notebook),
            str(executed),
            parameters=values | {"mlflow_run_id": run_id, "out_dir": str(out_dir)},
            kernel_name="python3",
            language="python",
            cwd=os.getcwd(),
            progress_bar=sys.stderr.isatty(),
            config=kernel_config(),
        )
        status = "FINISHED"
    except Exception as e:  # papermill's execution error, a dead kernel, ...
        status = "FAILED"
        error = _last_line(str(e))
    report, full = out_dir / "report.html", out_dir / "notebook.html"
    try:
        if executed.exists():
            _to_html(executed, report, values, summary["mlflow_url"], meta.get("run_name", ""))
            _to_html(executed, full, values, summary["mlflow_url"], meta.get("run_name", ""), code=True)
    except OSError as e:  # a full disk: the run's checkpoints and MLflow history are whole; say so and fail the run
        if e.errno not in DISK_FULL:
            raise
        status, error = "FAILED", disk_full(e, f"the report of {out_dir}", f"Checkpoints and the MLflow run are kept: free space, "
                                            f"then `omni run --resume {out_dir}`").strerror
    metrics = {}
    if run_id:
        for path in (executed, full, report):
            if path.exists():
                track.Tracker(run_id).log_artifact(path)
        metrics = track.run_metrics(run_id)
        track.end_run(run_id, status)
    summary |= {
        "status": status,
        "error": error,
        "headline": {k: metrics[k] for k in headline if k in metrics},
        "html": "report.html" if report.exists() else "",
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
    }
    write_summary(out_dir, summary)
    if reports is not None:
        index.write_index(reports)
    return RunResult(meta["run_name"], status, run_id, out_dir, metrics, error)


def _last_line(text: str) -> str:
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else "failed"


# nbconvert's lab template without what it fetches from a CDN (require.js, MathJax, mermaid, the
# widget manager): a report opens complete offline. No notebook here uses maths, diagrams or widgets.
OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
"""


def _to_html(executed: Path, report: Path, values: dict[str, Any], mlflow_url: str, title: str, code: bool = False) -> None:
    """Code-free HTML (with `code`: the whole executed notebook), opened by what a reader needs first:
    the parameters and a link to the MLflow run. Self-contained: styles inline, nothing from a CDN."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=not code, exclude_input_prompt=not code, exclude_output_prompt=not code,
                            extra_loaders=[jinja2.DictLoader({"omni_offline.html.j2": OFFLINE_TEMPLATE})],
                            template_file="omni_offline.html.j2")
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    rows = "".join(f"<tr><td><code>{html.escape(str(k))}</code></td><td>{html.escape(str(v))}</td></tr>" for k, v in values.items())
    ui = track.ui_command()
    served = f" (while <code>{html.escape(ui)}</code> runs)" if ui else ""
    link = f' · <a href="{html.escape(mlflow_url)}">MLflow run</a>{served}' if mlflow_url else ""
    header = (
        f'<div style="font-family:system-ui,sans-serif;margin:1em 2em;font-size:90%">'
        f"<details><summary><b>{html.escape(title)}</b>: parameters{link}</summary>"
        f'<table style="border-collapse:collapse">{rows}</table></details></div>'
    )
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + header, body, count=1)
    atomic_write(report, body)


def _resume_targets(resume: str, reports: Path) -> tuple[Path | None, list[Path]]:
    """(the grid's folder or None, the report folders to rerun: one run's, or a grid's unfinished points)."""
    folder = Path(resume)
    if not folder.is_dir():
        folder = index.report_dir_of(resume, reports)
    summary = index.read_summary(folder)
    if not summary:
        raise ExperimentError(f"{folder}: not a report folder (no summary.json)")
    if summary.get("grid_parent"):
        children = sorted(p.parent for p in folder.glob("*/summary.json"))
        return folder, [c for c in children if index.read_summary(c).get("status") != "FINISHED"]
    return None, [folder]


@contextlib.contextmanager
def claimed(folder: Path) -> Iterator[None]:
    """This process alone resumes `folder` while in the block: an exclusive lock on folder/.resume.lock
    (released by the kernel if the process dies, so it never goes stale), holding the holder's pid."""
    f = open(folder / ".resume.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise ExperimentError(f"{folder}: another `omni run --resume` is resuming it (pid {holder} on {socket.gethostname()}); "
                              "wait for it to end") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def refuse_running(folders: list[Path]) -> None:
    """A run still RUNNING (its process alive here, or on another host as far as its folder says) is
    not resumed: two processes would write one folder and one MLflow run."""
    for folder in folders:
        s = index.read_summary(folder)
        if s.get("status") == "RUNNING":
            raise ExperimentError(f"{folder}: still running (pid {s.get('pid', '?')} on {s.get('host', '?')}, started {s.get('started', '?')}); "
                                  "resume it once it has ended or was killed")


def resume_experiment(resume: str, reports: str | Path = "reports", workers: int = 1) -> list[RunResult]:
    """Rerun an interrupted run (or a grid's unfinished points) in place: same notebook, parameters,
    MLflow run and folder; training resumes from the checkpoints the run left there. Refused while
    the run (or another resume of it) is still going."""
    reports = Path(reports)
    grid, targets = _resume_targets(resume, reports)
    _prepare_env(workers)
    with contextlib.ExitStack() as stack:
        for folder in ([grid] if grid is not None else []) + targets:
            stack.enter_context(claimed(folder))
        index.mark_dead_runs(reports)
        refuse_running(targets)
        return _resume(grid, targets, reports, workers)


def _resume(grid: Path | None, targets: list[Path], reports: Path, workers: int) -> list[RunResult]:

    def one(folder: Path) -> RunResult:
        s = index.read_summary(folder)
        if s.get("run_id"):
            track.reopen_run(s["run_id"])
        meta = {k: s[k] for k in ("experiment", "source", "notebook", "description", "run_name", "parent_run_id", "started", "headline_keys") if k in s}
        return execute(Path(s["notebook"]), s.get("params", {}), folder, s.get("run_id", ""), s.get("headline_keys", []),
                       meta | {"resumed": True}, reports)

    results = _map(one, targets, workers)
    if grid is not None:  # the grid is finished once every point is
        s = index.read_summary(grid)
        children = [index.read_summary(p.parent) for p in grid.glob("*/summary.json")]
        status = "FINISHED" if all(c.get("status") == "FINISHED" for c in children) else "FAILED"
        write_summary(grid, s | {"status": status, "finished": dt.datetime.now().isoformat(timespec="seconds")})
        if s.get("run_id"):
            track.end_run(s["run_id"], status)
    index.write_index(reports)
    return results


def _prepare_env(workers: int) -> None:
    os.environ.setdefault("MLFLOW_TRACKING_URI", track.tracking_uri())  # the kernels inherit it
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "omni" / "numba"))
    os.environ.setdefault("TQDM_DISABLE", "1")  # a report is read after the fact: progress bars are noise there
    if workers > 1:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // workers))
    track.init_store()  # migrations once, under a lock: parallel first runs race otherwise


def _map(fn, items: list, workers: int) -> list:
    if workers > 1 and len(items) > 1:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))
    return [fn(x) for x in items]


def run_experiment(path: str | Path, overrides: dict[str, Any] | None = None, reports: str | Path = "reports", workers: int = 1) -> list[RunResult]:
    exp = load_experiment(path, overrides)
    points = grid_points(exp)
    found = params.notebook_config(read_notebook(exp.notebook))
    checked = [checked_params(exp, p, found) for p in points]  # every point's values, before any kernel starts
    reports = Path(reports)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    _prepare_env(workers)
    index.mark_dead_runs(reports)
    track.experiment_id(exp.name)  # create once, before any parallel worker
    top = new_report_dir(reports / exp.name, stamp)
    stamp = top.name
    base = {"experiment": exp.name, "source": str(exp.source), "notebook": str(exp.notebook), "description": exp.description,
            "headline_keys": exp.headline}
    keys = varying(exp) if len(points) > 1 else []
    # what MLflow's run page shows as the run's source: the notebook and the commit (the kernel adds
    # the commit too, but a notebook that fails before it gets there still has it)
    tags = track.source_tags(exp.notebook) | track.git_state(Path(track.__file__).resolve().parent)
    parent = ""
    if len(points) > 1:
        grid_desc = {"grid": json.dumps(exp.grid), "points": json.dumps(exp.points)}
        parent = track.start_run(exp.name, f"{exp.name}-{stamp}", params=exp.parameters | grid_desc, tags=tags)
        parent_exp = track.experiment_id(exp.name)
        write_summary(top, base | {"run_name": f"{exp.name}-{stamp}", "run_id": parent, "experiment_id": parent_exp, "status": "RUNNING",
                                   "grid_parent": True, "started": stamp, "params": exp.parameters | grid_desc, "pid": os.getpid(),
                                   "host": socket.gethostname(), "mlflow_url": track.run_url(parent, parent_exp)})

    def one(i: int) -> RunResult:
        suffix = slug(points[i], keys) if keys else ""
        run_name = f"{exp.name}-{stamp}" + (f"-{suffix}" if suffix else "")
        run_id = track.start_run(exp.name, run_name, params=checked[i], parent_run_id=parent or None, tags=tags)
        out = top / (suffix or f"point{i}") if parent else top
        meta = base | {"run_name": run_name, "parent_run_id": parent, "started": stamp}
        return execute(exp.notebook, checked[i], out, run_id, exp.headline, meta, reports)

    results = _map(one, list(range(len(points))), workers)

    if parent:
        status = "FINISHED" if all(r.status == "FINISHED" for r in results) else "FAILED"
        if exp.summary is not None:
            # the summary notebook logs into the parent run and reads its children from there
            meta = base | {"run_name": f"{exp.name}-{stamp}", "parent_run_id": "", "started": stamp, "grid_parent": True}
            summary = execute(exp.summary, {}, top, parent, exp.headline, meta, reports)
            results.append(summary)
            status = "FINISHED" if status == "FINISHED" and summary.status == "FINISHED" else "FAILED"
        else:
            write_summary(top, index.read_summary(top) | {"status": status, "finished": dt.datetime.now().isoformat(timespec="seconds")})
        track.end_run(parent, status)  # a failed child fails the parent, whatever the summary did
    index.write_index(reports)
    return results
