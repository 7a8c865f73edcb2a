"""The trainable-axis table (omni.experiments.hearing): rows from a grid's children, committed rows
where the grid did not train an arm, and the verdict sentence computed from them."""

import json
import math

import pandas as pd
import pytest

from omni.experiments import hearing


def child(run_id: str, start: int, params: dict, metrics: dict, status: str = "FINISHED") -> dict:
    return {"run_id": run_id, "status": status, "start_time": start} | {f"params.{k}": v for k, v in params.items()} \
        | {f"metrics.{k}": v for k, v in metrics.items()}


def scores(joint: float, joint_control: float, ctc: float, greedy: float = 1.1) -> dict:
    return {"clear_joint_wer": joint, "clear_joint_control_wer": joint_control, "clear_ctc_wer": ctc, "clear_greedy_wer": greedy,
            "clear_greedy_control_wer": 1.3, "clear_joint_cer": joint / 2, "clear_greedy_cer": greedy / 2, "clear_whisper_wer": 0.454,
            "train_seconds": 300.0}


@pytest.fixture
def grid(monkeypatch):
    runs = pd.DataFrame([
        child("a", 1, {"trainable": "projector", "steps": "600"}, scores(0.50, 1.00, 0.52)),
        child("b", 2, {"trainable": "projector+lm", "steps": "0", "run": "models/hear"}, scores(0.38, 1.05, 0.41)),
        child("c", 3, {"trainable": "projector+lora", "steps": "600"}, scores(0.2, 0.2, 0.2), status="FAILED"),
    ])
    monkeypatch.setattr(hearing, "child_runs", lambda parent: runs)
    return runs


def test_rows_are_the_finished_children_in_the_order_they_ran(grid):
    table = hearing.grid_table("parent")
    assert list(table.index) == ["projector only (frozen LM)", "hear (committed, evaluated as it is)"]  # the failed run is left out
    assert table.loc["projector only (frozen LM)", "joint WER"] == 0.50 and table.loc["hear (committed, evaluated as it is)", "CTC readout WER"] == 0.41
    assert set(hearing.COLUMNS) <= set(table.columns)


def test_committed_rows_fill_in_only_the_arms_the_grid_did_not_train(grid, tmp_path):
    rows = [{"system": "projector only (frozen LM)", "joint WER": 0.6}, {"system": "projector + LoRA", "joint WER": 0.45, "train s": 900.0},
            {"system": "projector + the whole LM", "joint WER": 0.46, "source": "measured: reports/hearing/later/model"}]
    (tmp_path / "provenance.json").write_text(json.dumps({"commit": "0123456789abc", "measured_by": "experiments/hearing.yaml",
                                                          "trainable_axis": rows}))
    table = hearing.axis_table("parent", tmp_path)
    assert table.loc["projector only (frozen LM)", "joint WER"] == 0.50  # measured here wins over the committed figure
    assert table.loc["projector + LoRA", "joint WER"] == 0.45 and "committed" in table.loc["projector + LoRA", "source"]
    assert "012345678" in table.loc["projector + LoRA", "source"] and math.isnan(table.loc["projector + LoRA", "CTC readout WER"])
    assert table.loc["projector + the whole LM", "source"] == "committed: reports/hearing/later/model"  # a row added later keeps its own
    assert hearing.axis_table("parent", tmp_path / "nothing").shape[0] == 2  # no provenance: the grid alone


def test_the_verdict_names_the_best_row_whether_it_hears_and_the_distance_to_whisper(grid):
    table = hearing.grid_table("parent")
    v = hearing.verdict(table)
    assert v.startswith("It hears") and "hear (committed" in v and "0.380" in v and "0.074 below Whisper" in v and "0.410 to 0.380" in v
    deaf = table.assign(**{"joint, shuffled audio": table["joint WER"] + 0.05})
    assert hearing.verdict(deaf).startswith("It does not hear yet")
    assert "nothing to compare" in hearing.verdict(table.assign(**{"joint WER": float("nan")}))


def test_arms_measured_later_join_the_committed_models_axis_once(tiny_alignment, tmp_path):
    """experiments/commit_hear.py --add-axis: an arm's row (from its run folder's scores) goes into the
    committed model's provenance beside the rows already there, replacing an older row of the same arm,
    in the axis's order; adding it again changes nothing."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("commit_hear", REPO / "experiments" / "commit_hear.py")
    commit_hear = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(commit_hear)
    lora = {"system": hearing.ARMS["projector+lora"], "source": "committed", "joint WER": 0.3}
    stale = {"system": hearing.ARMS["projector"], "source": "an older run", "joint WER": 9.9}
    (tmp_path / "provenance.json").write_text(json.dumps({"commit": "abc", "trainable_axis": [lora, stale]}))
    for _ in range(2):
        commit_hear.add_axis(tmp_path, str(tiny_alignment.run))
        rows = json.loads((tmp_path / "provenance.json").read_text())["trainable_axis"]
        assert [r["system"] for r in rows] == [hearing.ARMS["projector"], hearing.ARMS["projector+lora"]] and rows[1] == lora
    new, scores = rows[0], tiny_alignment.result.scores
    assert new["source"].startswith("measured: ") and new["joint WER"] != 9.9
    measured = [(col, m) for col, m in hearing.COLUMNS.items() if m in scores]
    assert measured and all(new[col] == pytest.approx(scores[m]) for col, m in measured)
