"""`omni run` end to end on tiny notebooks: real papermill kernels, a real MLflow sqlite store."""

import json
import os
from pathlib import Path

import pytest

from omni import track
from omni.cli import main
from omni.report import ExperimentError, load_experiment, parse_overrides, run_experiment

NOTEBOOK = '''# %% tags=["parameters"]
x = 1
fail = False
mlflow_run_id = ""
out_dir = ""

# %%
from omni import track
t = track.attach(mlflow_run_id)
for step in range(3):
    t.log_metrics({"y": x * 10 + step}, step=step)
t.log_metrics({"score": x * 2.5})
t.flush()
print("x is", x)

# %%
assert not fail, "asked to fail"
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    Path("notebooks").mkdir()
    Path("notebooks/nb.py").write_text(NOTEBOOK)
    Path("exp.yaml").write_text("name: tiny\nnotebook: notebooks/nb.py\nparameters: {x: 2}\nheadline: [score]\n")
    return tmp_path


def test_run_logs_to_mlflow_and_writes_reports(project):
    (r,) = run_experiment("exp.yaml", {"x": 3})
    assert r.status == "FINISHED", r.error
    assert r.metrics["score"] == 7.5
    assert [v for _, v in track.metric_history(r.run_id, "y")] == [30, 31, 32]
    run = track.client().get_run(r.run_id)
    assert run.data.params["x"] == "3" and run.info.status == "FINISHED"
    artifacts = {a.path for a in track.client().list_artifacts(r.run_id)}
    assert {"notebook.ipynb", "report.html"} <= artifacts
    summary = json.loads((r.report_dir / "summary.json").read_text())
    assert summary["headline"] == {"score": 7.5} and summary["status"] == "FINISHED"
    html = (r.report_dir / "report.html").read_text()
    assert "x is 3" in html and "log_metrics" not in html  # outputs shown, code hidden
    index = Path("reports/index.html").read_text()
    assert "score=7.5" in index and f"{r.report_dir.relative_to(Path('reports')).as_posix()}/report.html" in index


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
    with pytest.raises(ExperimentError, match="expected NAME=VALUE"):
        parse_overrides(["x"])


def test_grid_makes_parent_and_children(project):
    results = run_experiment("exp.yaml", {"x": [1, 2]}, workers=2)
    assert sorted(r.metrics["score"] for r in results) == [2.5, 5.0]
    parents = {track.client().get_run(r.run_id).data.tags.get("mlflow.parentRunId") for r in results}
    assert len(parents) == 1 and None not in parents
    parent = track.client().get_run(parents.pop())
    assert parent.info.status == "FINISHED"
    assert len(list(Path("reports/tiny").glob("*/x=*/report.html"))) == 2
