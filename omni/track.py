"""MLflow tracking, reduced to what experiments here need.

Design choices:
- The runner (`omni run`) owns a run's life: it creates the run, passes its id to the notebook as
  the `mlflow_run_id` parameter, and closes it as FINISHED or FAILED. A notebook only *attaches*
  and logs. So a crashed notebook still leaves a run, marked failed, with what it logged so far.
- Under plain papermill (no run id) a notebook starts a run of its own (`open_run`) and so owns it:
  `tracker.finish()`, every notebook's last line, ends it FINISHED; a cell that raises, or a process
  that ends before finish(), ends it FAILED.
- Everything goes through `MlflowClient` with explicit run ids: no global "active run", which is
  what makes parallel grid workers and nested (parent/child) runs safe.
- Per-step metrics are buffered and sent with `log_batch` (one sqlite transaction per flush,
  not one per number).
- `NullTracker` has the same methods and does nothing: a notebook opened by hand without a run
  logs nowhere, with no `if`s in the code.
- Default store: `sqlite:///mlflow.db` in the working directory; `MLFLOW_TRACKING_URI` wins.
- What MLflow's UI reads is set the way it reads it: the run's source (`mlflow.source.name`/`type`:
  without them the run page says "Source —" and hides the commit it has), and the experiment kind
  (`mlflow.experimentKind`: model training, not GenAI). MLflow 3.17's UI opens an experiment in its
  GenAI view unless told otherwise, whatever the tag says, so every link built here asks for the
  runs table (`?workflowType=machine_learning`).
- Links point at `ui_url()`: `MLFLOW_UI_URL`, else a tracking server's own address, else what
  `mlflow ui` serves by default; reports/index.html builds its links when it is written, so
  `MLFLOW_UI_URL=... omni index` moves them all.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from omni.common import file_lock

FLUSH_EVERY = 200  # buffered metric values before a log_batch
FLUSH_SECONDS = 15.0  # ... or this long since the last flush: a killed run loses at most this much
KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow's tag for a model-training experiment
UI_DEFAULT = "http://127.0.0.1:5000"  # where `mlflow ui` serves when given no --host/--port
MODEL_TRAINING = "workflowType=machine_learning"  # the UI's "Model training" view, asked for in every link


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client():
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    from mlflow.tracking import MlflowClient  # imported late: mlflow costs ~1 s to import

    return MlflowClient(tracking_uri=tracking_uri())


def artifact_root() -> str | None:
    """Artifacts beside a sqlite database (`mlartifacts/`), not in whatever directory a process runs in."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides for itself


def experiment_id(name: str) -> str:
    """Get or create a model-training experiment (KIND). Create it once, before parallel workers (creation races)."""
    mlc = client()
    exp = mlc.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:  # made before omni set the kind
            mlc.set_experiment_tag(exp.experiment_id, *next(iter(KIND.items())))
        return exp.experiment_id
    try:
        root = artifact_root()
        return mlc.create_experiment(name, artifact_location=f"{root}/{name}" if root else None, tags=KIND)
    except Exception:  # another process created it between our two calls
        return mlc.get_experiment_by_name(name).experiment_id


def _flat(params: dict[str, Any]) -> dict[str, str]:
    # MLflow params are strings of at most 6000 characters
    return {k: str(v)[:6000] for k, v in params.items()}


def start_run(experiment: str, run_name: str, params: dict[str, Any] | None = None, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    mlc = client()
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlc.create_run(experiment_id(experiment), run_name=run_name, tags=tags)
    if params:
        from mlflow.entities import Param

        mlc.log_batch(run.info.run_id, params=[Param(k, v) for k, v in _flat(params).items()])
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def reopen_run(run_id: str) -> None:
    """Mark an ended run RUNNING again: a resumed run continues the same run and metric history."""
    client().update_run(run_id, status="RUNNING")


def last_step(run_id: str) -> int | None:
    """The highest step of any metric the run logged (what a killed run reached)."""
    run = client().get_run(run_id)
    steps = [m.step for key in run.data.metrics for m in client().get_metric_history(run_id, key)]
    return max(steps) if steps else None


def init_store() -> None:
    """Create or migrate the tracking database once, under a file lock: two first runs started
    together on a fresh sqlite file otherwise race MLflow's schema migration and one crashes."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    with file_lock(uri[len("sqlite:///") :] + ".lock"):
        client().search_experiments(max_results=1)


def ui_url() -> str:
    """The MLflow UI's address: MLFLOW_UI_URL, else the tracking server's (it serves the UI), else
    what `mlflow ui` serves by default."""
    uri = tracking_uri()
    url = os.environ.get("MLFLOW_UI_URL") or (uri if uri.startswith(("http://", "https://")) else UI_DEFAULT)
    return url.rstrip("/")


def ui_command() -> str:
    """How to bring up the UI that ui_url() names (empty when a tracking server already serves it)."""
    from urllib.parse import urlsplit

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return ""
    where = urlsplit(ui_url())
    host = f" --host {where.hostname}" if where.hostname not in (None, "127.0.0.1", "localhost") else ""
    port = f" --port {where.port}" if where.port not in (None, 5000) else ""
    return f"mlflow ui --backend-store-uri {uri}{host}{port}"


def run_url(run_id: str, experiment: str | None = None, ui: str | None = None) -> str:
    """Where the MLflow UI shows the run (its experiment id looked up when not given)."""
    experiment = experiment or client().get_run(run_id).info.experiment_id
    return f"{ui or ui_url()}/#/experiments/{experiment}/runs/{run_id}?{MODEL_TRAINING}"


def experiment_url(experiment: str, ui: str | None = None) -> str:
    """The runs table of an experiment (by id) in the MLflow UI."""
    return f"{ui or ui_url()}/#/experiments/{experiment}/runs?{MODEL_TRAINING}"


def run_metrics(run_id: str) -> dict[str, float]:
    """Latest value of every metric of a run."""
    return dict(client().get_run(run_id).data.metrics)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client().get_metric_history(run_id, key)]


class Tracker:
    """Logs into one existing MLflow run."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = client()
        self._buffer: list = []
        self._flushed = time.monotonic()
        self.owned = False  # True when this process started the run (plain papermill): it also ends it
        atexit.register(self._at_exit)  # a notebook that forgets to flush still gets its last metrics logged

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        # a param cannot change within a run; the runner already logged the notebook's parameters
        new = {k: v for k, v in _flat(params).items() if k not in have}
        if new:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for k, v in metrics.items():
            self._buffer.append(Metric(k, float(v), now, int(step)))
        if len(self._buffer) >= FLUSH_EVERY or time.monotonic() - self._flushed > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._flushed = time.monotonic()
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_input(self, name: str, path: str | Path) -> None:
        """Name the data or model a run read: tag `input.<name>` = path and a content hash."""
        self.set_tags({f"input.{name}": f"{path} sha256:{content_hash(path)}"})

    def finish(self, status: str = "FINISHED") -> None:
        """End the run if this process started it; a run the runner owns is ended by the runner."""
        self.flush()
        if self.owned:
            end_run(self.run_id, status)
            self.owned = False

    def _at_exit(self) -> None:
        self.flush()
        if self.owned:  # the process ends before the notebook reached finish(): it failed
            end_run(self.run_id, "FAILED")
            self.owned = False

    def _cell_ran(self, result) -> None:
        """IPython's post_run_cell event, for a run this kernel started: a cell that raised ends it FAILED
        now. papermill stops at that cell and kills a kernel that takes over 5 s to exit (joining a
        process pool's workers can), and a killed kernel never reaches _at_exit: the run would stay
        RUNNING. A later finish() (a notebook fixed and rerun by hand) still ends it FINISHED."""
        if self.owned and (result.error_in_exec is not None or result.error_before_exec is not None):
            self.flush()
            end_run(self.run_id, "FAILED")

    def log_figure(self, fig, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / name
            fig.savefig(path, dpi=120, bbox_inches="tight")
            self.client.log_artifact(self.run_id, str(path), artifact_path="figures")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path=artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path=artifact_path)


class NullTracker:
    """Same surface as Tracker; does nothing."""

    run_id = ""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None: ...
    def flush(self) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_input(self, name: str, path: str | Path) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...
    def log_figure(self, fig, name: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


def attach(run_id: str | None) -> Tracker | NullTracker:
    """Log into an existing run, or nowhere when run_id is empty (library code called from Python)."""
    return Tracker(run_id) if run_id else NullTracker()


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    """The commit a run ran from and whether the tree had uncommitted changes (MLflow's own tag name)."""
    import subprocess

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no")))}


def source_tags(notebook: str | Path) -> dict[str, str]:
    """The run's source as MLflow's UI reads it (the run page's "Source": the notebook and the commit)."""
    return {"mlflow.source.name": str(notebook), "mlflow.source.type": "NOTEBOOK"}


def notebook_of(experiment: str) -> str:
    """The notebook of an experiment, `notebooks/NN_<experiment>.ipynb`, for a run a notebook opened
    itself (plain papermill: nothing told it its own path); the experiment's name when there is none."""
    found = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob(f"[0-9][0-9]_{experiment}.ipynb"))
    return f"notebooks/{found[0].name}" if found else experiment


def content_hash(path: str | Path, length: int = 16) -> str:
    """sha256 of a file, or of a folder's files (names and bytes), truncated: names the data a run read."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:length] if files else "missing"


def _ipython():
    """The running IPython shell (a notebook's kernel), or None."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def open_run(experiment: str, run_id: str, config: Any, extra: dict[str, Any] | None = None) -> Tracker:
    """What every notebook calls: log into `run_id` (given by `omni run`), or start a run of its own
    in `experiment` when the notebook runs under plain papermill or by hand, so no run logs nowhere.
    Every field of `config` (a dataclass) is logged as a param under its own name, with `extra`
    (e.g. out_dir), and the git commit as tags. A run started here ends FINISHED at finish(), FAILED
    when a cell raises (in a kernel) or the process ends first."""
    from dataclasses import asdict

    params = asdict(config) | dict(extra or {})
    if run_id:
        tracker = Tracker(run_id)
    else:
        tracker = Tracker(start_run(experiment, f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"))
        tracker.owned = True
        shell = _ipython()
        if shell is not None:
            shell.events.register("post_run_cell", tracker._cell_ran)
    tracker.log_params(params)
    tags = git_state(Path(__file__).resolve().parent)
    if tracker.owned:  # the runner names the notebook of the runs it starts
        tags |= source_tags(notebook_of(experiment))
    tracker.set_tags(tags)
    return tracker
