"""The smoke experiment end to end through `omni run` (experiments/smoke.yaml -> notebooks/01_smoke.py in a
real papermill kernel, a throwaway MLflow store, a throwaway reports folder), made small: depth 2 and
40 steps, the smallest run measured to pass the whole verdict (loss drop 5.2, audio adds 1.8 bits per
caption, 1 of 5 captions decoded from audio vs 0 for the control). A second run with a single step
cannot drop at all: its verdict fails, and it must still be reported, as FAILED."""

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from omni import track
from omni.run.runner import run_experiment

REPO = Path(__file__).resolve().parents[1]
HEADLINE = yaml.safe_load((REPO / "experiments/smoke.yaml").read_text())["headline"]
assert {"loss_drop", "control_gap", "caption_accuracy", "control_caption_accuracy", "passed"} <= set(HEADLINE)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the experiment's paths (notebook, smoke manifest) are relative to the repo
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        # MLflow's default artifact root is ./mlruns of the working directory, the repo here: keep it in tmp
        track.client().create_experiment("smoke", artifact_location=(tmp / "artifacts").as_uri())
        (passed,) = run_experiment("experiments/smoke.yaml", {"steps": 40, "depth": 2}, reports=tmp / "reports")
        (failed,) = run_experiment("experiments/smoke.yaml", {"steps": 1, "depth": 2}, reports=tmp / "reports")
        yield {"passed": passed, "failed": failed, "reports": tmp / "reports"}


def test_smoke_passes_and_reports(smoke):
    r = smoke["passed"]
    assert r.status == "FINISHED", r.error
    m = r.metrics
    for key in HEADLINE + ["initial_loss", "control_final_loss", "train_seconds", "encode_seconds"]:
        assert key in m and math.isfinite(m[key]), key
    assert m["loss_drop"] >= 0.5 and m["passed"] == 1.0
    assert m["control_gap_bits_per_caption"] >= 1.0 and m["caption_accuracy"] > m["control_caption_accuracy"]
    assert m["loss_drop"] == pytest.approx(m["initial_loss"] - m["final_loss"])
    assert m["control_gap"] == pytest.approx(m["control_final_loss"] - m["final_loss"])
    assert 0 <= m["caption_accuracy"] <= 1 and 0 <= m["control_caption_accuracy"] <= 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{smoke['reports'].parent / 'mlflow.db'}")
        # both curves of the figure: the real run's loss and its control's, one value per step
        assert [s for s, _ in track.metric_history(r.run_id, "loss")] == list(range(40))
        assert [s for s, _ in track.metric_history(r.run_id, "control/loss")] == list(range(40))
        artifacts = {a.path for a in track.client().list_artifacts(r.run_id, "figures")}
        assert "figures/loss.png" in artifacts
    assert (smoke["reports"].parent / "artifacts" / r.run_id / "artifacts" / "figures" / "loss.png").is_file()
    html = (r.report_dir / "report.html").read_text()
    assert "PASS: loss drop" in html and "audio adds" in html and "control final loss" in html and "captions decoded exactly" in html
    assert html.count('src="data:image/png;base64') == 1  # the loss figure (both curves), shown once
    assert "smoke.run(" not in html  # code hidden
    assert "IProgress" not in html and "Warning" not in html  # no warning boxes heading the report
    summary = json.loads((r.report_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and set(summary["headline"]) == set(HEADLINE)


def test_failed_verdict_is_reported_as_failed(smoke):
    r = smoke["failed"]
    assert r.status == "FAILED" and "FAIL: loss drop 0.000" in r.error
    assert r.metrics["loss_drop"] == 0.0 and r.metrics["passed"] == 0.0  # logged before the verdict
    html = (r.report_dir / "report.html").read_text()
    assert "FAIL: loss drop 0.000" in html and "AssertionError" in html
    summary = json.loads((r.report_dir / "summary.json").read_text())
    assert summary["status"] == "FAILED" and "FAIL: loss drop" in summary["error"]


def test_index_lists_both_runs(smoke):
    index = (smoke["reports"] / "index.html").read_text()
    for r in (smoke["passed"], smoke["failed"]):
        link = f"{r.report_dir.relative_to(smoke['reports']).as_posix()}/report.html"
        assert link in index and r.name in index
    assert index.count('class="ok">FINISHED') == 1 and index.count('class="fail">FAILED') == 1
    assert 'title="loss_drop">training loss drop</span>' in index and 'title="passed">verdict</span> <b>1</b>' in index
    assert os.path.isfile(smoke["reports"] / "index.html")
