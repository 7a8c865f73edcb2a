"""`omni run` end to end on tiny notebooks: real papermill kernels, a real MLflow sqlite store."""

import json
import os
from pathlib import Path

import pytest

from conftest import notebook_project
from omni import track
from omni.cli import main
from omni.run.experiment import ExperimentError, grid_points, load_experiment, parse_overrides
from omni.run.index import write_index
from omni.run.runner import run_experiment

NOTEBOOK = '''# %% tags=["parameters"]
x = 1
fail = False
mlflow_run_id = ""
out_dir = ""

# %%
import pathlib
from omni import track
from omni.common import progress
t = track.attach(mlflow_run_id)
for step in progress(range(3), desc="steps"):  # omni run turns every bar off: a report is read afterwards
    t.log_metrics({"y": x * 10 + step}, step=step)
t.log_metrics({"score": x * 2.5})
t.flush()
print("x is", x)
index = pathlib.Path("reports/index.html")
print("listed while running:", index.exists() and "RUNNING" in index.read_text())

# %%
assert not fail, "asked to fail"
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    return notebook_project(tmp_path, monkeypatch, NOTEBOOK, "name: tiny\nnotebook: notebooks/nb.py\nparameters: {x: 2}\nheadline: [score]\n")


def test_run_logs_to_mlflow_and_writes_reports(project, capfd):
    (r,) = run_experiment("exp.yaml", {"x": 3})
    assert r.status == "FINISHED", r.error
    assert r.metrics["score"] == 7.5
    assert [v for _, v in track.metric_history(r.run_id, "y")] == [30, 31, 32]
    run = track.client().get_run(r.run_id)
    assert run.data.params["x"] == "3" and run.info.status == "FINISHED"
    artifacts = {a.path for a in track.client().list_artifacts(r.run_id)}
    assert {"notebook.ipynb", "notebook.html", "report.html"} <= artifacts  # the notebook readable in MLflow's UI too
    summary = json.loads((r.report_dir / "summary.json").read_text())
    assert summary["headline"] == {"score": 7.5} and summary["status"] == "FINISHED"
    html = (r.report_dir / "report.html").read_text()
    assert "x is 3" in html and "log_metrics" not in html  # outputs shown, code hidden
    assert "listed while running: True" in html  # the index listed the run while it ran
    assert "steps:" not in html and "%|" not in html  # no progress bar
    assert "log_metrics" in (r.report_dir / "notebook.html").read_text()  # the whole notebook, code included
    index = Path("reports/index.html").read_text()
    assert '<span class="m" title="score">score</span> <b>7.5</b>' in index  # a key without a label shows as itself
    assert f"{r.report_dir.relative_to(Path('reports')).as_posix()}/report.html" in index
    assert "without encryption" not in capfd.readouterr().err  # ipykernel had nothing to warn about
    # what MLflow's UI reads: the run's source (notebook and commit; without them its page says "Source —"), the experiment's kind
    assert run.data.tags["mlflow.source.name"] == "notebooks/nb.py" and run.data.tags["mlflow.source.type"] == "NOTEBOOK"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert track.client().get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_mlflow_links_follow_where_the_ui_is(project):
    """Links to runs and experiments open the runs table, wherever MLFLOW_UI_URL (or a tracking server)
    says the UI is; the index builds them when it is written, so `omni index` moves them all."""
    from omni.run.runner import write_summary

    folder = Path("reports/tiny/20261205-120000")
    folder.mkdir(parents=True)
    write_summary(folder, {"experiment": "tiny", "run_name": "tiny-1", "status": "FINISHED", "run_id": "abc", "experiment_id": "7"})
    old = Path("reports/tiny/20261201-120000")  # written before experiment_id was kept: the ids come from its URL
    old.mkdir()
    write_summary(old, {"experiment": "tiny", "run_name": "tiny-0", "status": "FINISHED", "run_id": "def",
                        "mlflow_url": "http://127.0.0.1:5000/#/experiments/7/runs/def"})
    assert track.run_url("abc", "7") == "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    os.environ["MLFLOW_UI_URL"] = "http://example.org:8123/"
    try:
        index = write_index("reports").read_text()
        for run in ("abc", "def"):
            assert f'href="http://example.org:8123/#/experiments/7/runs/{run}?workflowType=machine_learning"' in index
        assert 'href="http://example.org:8123/#/experiments/7/runs?workflowType=machine_learning"' in index  # the experiment
        assert track.ui_command().endswith(" --host example.org --port 8123")
    finally:
        del os.environ["MLFLOW_UI_URL"]
    assert ":8123" not in write_index("reports").read_text() and track.ui_command() == f"mlflow ui --backend-store-uri {track.tracking_uri()}"
    os.environ["MLFLOW_TRACKING_URI"] = "http://tracking.example.org:5555"  # a tracking server serves its own UI
    try:
        assert track.ui_url() == "http://tracking.example.org:5555" and track.ui_command() == ""
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"


def test_failed_notebook_still_reports_and_is_marked(project, capsys):
    code = main(["run", "exp.yaml", "-p", "fail=true"])
    assert code == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "asked to fail" in out
    (summary,) = [json.loads(p.read_text()) for p in Path("reports").glob("**/summary.json")]
    assert summary["status"] == "FAILED" and "asked to fail" in summary["error"]
    assert track.client().get_run(summary["run_id"]).info.status == "FAILED"
    assert "asked to fail" in (Path("reports") / "tiny").glob("*/report.html").__next__().read_text()
    assert "FAILED" in Path("reports/index.html").read_text()


def test_unknown_parameter_is_named(project, capsys):
    with pytest.raises(ExperimentError, match="'stepz'"):
        load_experiment("exp.yaml", {"stepz": 3})
    assert main(["run", "exp.yaml", "-p", "stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "valid: x, fail" in err
    Path("bad.yaml").write_text("name: bad\nnotebook: notebooks/nb.py\nparameters: {y: 1}\n")
    with pytest.raises(ExperimentError, match="bad.yaml parameters: unknown parameter 'y'"):
        load_experiment("bad.yaml")
    with pytest.raises(ExperimentError, match="expected NAME=VALUE or NAME VALUE"):
        parse_overrides(["x"])


def test_grid_makes_parent_and_children(project):
    results = run_experiment("exp.yaml", {"x": [1, 2]}, workers=2)
    assert sorted(r.metrics["score"] for r in results) == [2.5, 5.0]
    parents = {track.client().get_run(r.run_id).data.tags.get("mlflow.parentRunId") for r in results}
    assert len(parents) == 1 and None not in parents
    parent = track.client().get_run(parents.pop())
    assert parent.info.status == "FINISHED"
    assert len(list(Path("reports/tiny").glob("*/x=*/report.html"))) == 2


# --- parameters and experiment files are checked before any kernel starts ------------------------

CONFIG_MODULE = '''
from dataclasses import dataclass
from omni.params import require, require_choice


@dataclass
class TinyConfig:
    x: int = 1  # a count
    rate: float = 0.5  # a positive rate
    mode: str = "a"  # a | b
    fail: bool = False  # fail on purpose

    def __post_init__(self):
        require(self.x >= 1, "x", self.x, ">= 1")
        require(self.rate > 0, "rate", self.rate, "> 0")
        require_choice("mode", self.mode, ("a", "b"))
'''

CONFIG_NOTEBOOK = '''# ---
# jupyter:
#   omni:
#     config: tinycfg.TinyConfig
# ---

# %% tags=["parameters"]
x = 1
rate = 0.5
mode = "a"
fail = False
mlflow_run_id = ""
out_dir = ""

# %%
from omni import params, track
from tinycfg import TinyConfig
cfg = params.from_params(TinyConfig, globals())
t = track.open_run("typed", mlflow_run_id, cfg, {"out_dir": out_dir})
t.log_metrics({"score": cfg.x * cfg.rate})
t.finish()
'''


@pytest.fixture
def typed(project, monkeypatch):
    Path("tinycfg.py").write_text(CONFIG_MODULE)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.setenv("PYTHONPATH", str(project) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    Path("notebooks/typed.py").write_text(CONFIG_NOTEBOOK)
    Path("typed.yaml").write_text("name: typed\nnotebook: notebooks/typed.py\nheadline: [score]\n")
    return project


@pytest.mark.parametrize("arg, message", [
    ("x=-1", "parameter `x` = -1: must be >= 1"),
    ("x=abc", "parameter `x` = 'abc': expected int"),
    ("rate=0", "parameter `rate` = 0.0: must be > 0"),
    ("mode=c", "parameter `mode` = 'c': must be one of a, b"),
    ("fail=maybe", "parameter `fail` = 'maybe': expected bool"),
])
def test_bad_values_refused_before_any_kernel(typed, capsys, arg, message):
    assert main(["run", "typed.yaml", "-p", arg]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no traceback
    assert not Path("reports").exists()  # nothing ran, nothing was written


def test_bad_value_in_one_grid_point_stops_the_whole_grid(typed, capsys):
    assert main(["run", "typed.yaml", "-p", "x=[1,2,0]"]) == 2
    err = capsys.readouterr().err
    assert "[x=0]" in err and "parameter `x` = 0: must be >= 1" in err
    assert not Path("reports").exists()


def test_typed_run_logs_every_parameter_and_the_commit(typed):
    (r,) = run_experiment("typed.yaml", {"x": 3})
    assert r.status == "FINISHED", r.error
    run = track.client().get_run(r.run_id)
    assert run.data.params == {"x": "3", "rate": "0.5", "mode": "a", "fail": "False", "out_dir": str(r.report_dir)}
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40 and run.data.tags["git_dirty"] in ("True", "False")
    html = (r.report_dir / "report.html").read_text()
    assert "<code>rate</code></td><td>0.5" in html and f"runs/{r.run_id}" in html  # parameters and a link to the run
    assert f"runs/{r.run_id}" in Path("reports/index.html").read_text()


def test_papermill_style_overrides_and_listed_points(project):
    assert parse_overrides([["x", "3"], ["fail=true"], ["y", "[1, 2]"]]) == {"x": 3, "fail": True, "y": [1, 2]}
    with pytest.raises(ExperimentError, match="expected NAME=VALUE or NAME VALUE"):
        parse_overrides([["x", "1", "2"]])
    Path("pts.yaml").write_text("name: pts\nnotebook: notebooks/nb.py\ngrid: {fail: [false]}\n"
                                "points: [{x: 1}, {x: 5}]\nheadline: [score]\n")
    exp = load_experiment("pts.yaml")
    assert grid_points(exp) == [{"fail": False, "x": 1}, {"fail": False, "x": 5}]
    results = run_experiment("pts.yaml")
    assert sorted(r.metrics["score"] for r in results) == [2.5, 12.5]
    assert sorted(p.name for p in next(Path("reports/pts").iterdir()).iterdir() if p.is_dir()) == ["fail=False-x=1", "fail=False-x=5"]


@pytest.mark.parametrize("body, message", [
    ("grid: {x: []}", "grid axis `x` must be a non-empty list"),
    ("grid: {x: 3}", "grid axis `x` must be a non-empty list"),
    ("grid: [x, 1]", "`grid` must be a mapping"),
    ("points: [x]", "`points` must be a non-empty list of mappings"),
    ("points: [{z: 1}]", "points[0]: unknown parameter 'z'"),
    ("headline: score", "`headline` must be a list"),
    ("parameterz: {x: 1}", "unknown keys ['parameterz']"),
])
def test_malformed_experiment_files_are_refused_in_one_line(project, capsys, body, message):
    Path("bad.yaml").write_text(f"name: bad\nnotebook: notebooks/nb.py\n{body}\n")
    assert main(["run", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("omni: error: bad.yaml")


def test_empty_grid_from_the_command_line_is_refused(project, capsys):
    assert main(["run", "exp.yaml", "-p", "x=[]"]) == 2
    assert "empty grid" in capsys.readouterr().err


def test_report_folders_never_collide_and_index_lists_unreadable_ones(project):
    from omni.run.runner import new_report_dir

    a, b = new_report_dir(Path("reports/e"), "s"), new_report_dir(Path("reports/e"), "s")
    assert a != b and a.is_dir() and b.is_dir()
    (a / "summary.json").write_text("{not json")
    (Path("reports/smoke/adhoc/ckpt")).mkdir(parents=True)  # what a notebook run by plain papermill leaves: not a report
    page = write_index("reports").read_text()
    assert page.count("UNREADABLE") == 2 and "reports/e/s/summary.json: unreadable" in page and "no summary.json" in page
    assert "smoke/adhoc" in page.split("</table>")[1] and "smoke/adhoc" not in page.split("</table>")[0]


def test_index_labels_every_headline_metric_with_a_unit():
    """Every `headline:` key of experiments/*.yaml has a short label and a unit in the index; numbers
    read as numbers (integers whole, thousands separated)."""
    import yaml

    from omni.run.index import _fmt, _headline, metric_label

    repo = Path(__file__).resolve().parents[1]
    keys = {k for f in (repo / "experiments").glob("*.yaml") for k in yaml.safe_load(f.read_text()).get("headline", [])}
    unlabelled = sorted(k for k in keys if not metric_label(k) or not all(metric_label(k)))
    assert not unlabelled, f"add a (label, unit) to omni.run.index.METRICS for {unlabelled}"
    assert metric_label("clear_control_wer") == ("shuffled-audio control, WER, clear speech", metric_label("wer")[1])
    assert _fmt(1563000.0) == "1,563,000" and _fmt(0.029153) == "0.02915" and _fmt(202.0) == "202"
    assert _headline("train_tokens", 1563000.0) == ('<span class="m" title="train_tokens">training tokens</span> '
                                                    '<b>1,563,000</b> <span class="u">tokens</span>')
