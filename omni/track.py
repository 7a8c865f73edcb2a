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
    """Get or create an experiment. Create it once, before parallel workers (creation races)."""
    mlc = client()
    exp = mlc.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        root = artifact_root()
        return mlc.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
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


def run_url(run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """Where `mlflow ui` shows the run."""
    run = client().get_run(run_id)
    return f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


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
    tracker.set_tags(git_state(Path(__file__).resolve().parent))
    return tracker
