"""omni.eval.layer_probes, probes, compare, findings, ablation: probes per layer choice, the joint texture-weight
probe, the MLflow comparison and its findings, and a tiny layer grid end to end through `omni run` (real papermill kernels, a real MLflow sqlite store)."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import only_run, papermill, papermill_env
from omni import track
from omni.data.synth import SynthConfig
from omni.eval import compare, findings, layer_probes, probes
from omni.experiments import layer_ablation
from omni.experiments.alignment import AlignConfig, prepare_cache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 33-clip corpus (6 seen + 6 held-out voices), its feature cache and a tiny random frozen LM."""
    from conftest import tiny_lm

    root = tmp_path_factory.mktemp("ablation")
    cfg = SynthConfig(out=str(root / "corpus"), sentences=30, min_words=3, max_words=6, workers=1,
                      accents=("en-us", "en-gb"), variants=("f1", "f4", "m1", "m4", "whisper", "whisperf"))
    from omni.data.synth import build_corpus

    build_corpus(cfg)
    cfg = AlignConfig(corpus=str(root / "corpus"), features=str(root / "features"))
    cache = prepare_cache(cfg, progress=False)
    assert prepare_cache(cfg, progress=False).path == cache.path  # idempotent
    tiny_lm(root / "lm")
    return {"root": root, "cache": cache}


def test_probes_one_state_and_weighted(tiny):
    cache = tiny["cache"]
    res = layer_probes.run_probes(cache, "2", seed=0, attn_steps=5)
    m = res.metrics()
    for a in ("gender", "accent", "rate", "pitch", "style"):
        for split in ("test_seen_voice", "test"):
            for kind in ("linear", "attention", "chance"):
                assert 0.0 <= m[f"probe.{a}.{kind}.{split}"] <= 1.0
            assert m[f"probe.{a}.n_test.{split}"] + m[f"probe.{a}.dropped.{split}"] == 3
    assert "probe.voice.linear.test_seen_voice" in m and "probe.voice.linear.test" not in m  # identity: seen voices only
    assert m["time.probe.linear"] > 0 and m["time.probe.attention"] > 0 and not res.weights
    t = res.table()
    assert t.loc[("gender", "test"), "linear"] == m["probe.gender.linear.test"] and ("voice", "test") not in t.index

    w = layer_probes.run_probes(cache, "weighted_ln", attributes=["gender", "style"], probes=["linear"], weighted_steps=10)
    assert set(w.weights) == {"gender", "style"}
    for a, weights in w.weights.items():
        assert weights.shape == (cache.n_states,) and abs(weights.sum() - 1) < 1e-5
        steps = [s for s, _ in w.history[a]]
        assert steps[0] == 0 and 1 <= steps[-1] <= 10 and steps == sorted(set(steps)) and np.allclose(w.history[a][0][1], 1 / cache.n_states)
    assert f"probe.gender.weight.{cache.n_states - 1}" in w.metrics()


def test_weighted_probe_finds_the_informative_state():
    rng = np.random.default_rng(0)
    N, S, d = 300, 4, 16
    y = rng.integers(0, 3, N)
    X = rng.normal(size=(N, S, d)).astype(np.float32)
    X[:, 2, :3] += 2.0 * np.eye(3)[y]  # only state 2 knows the label
    wp = probes.weighted_linear_probe(X[:200], y[:200], [(X[200:], y[200:])], steps=30)
    assert wp.weights.argmax() == 2 and wp.weights[2] > 0.5
    assert wp.result.accuracy > 0.8 and wp.result.n_test == 100


def test_pooled_states_and_subset(tiny):
    cache = tiny["cache"]
    pooled = layer_probes.pooled_states(cache)
    assert pooled["mean"].shape == (len(cache), cache.n_states, cache.d_model)
    first = cache.load_states([3])[0].float().mean(1).numpy()
    assert np.allclose(pooled["mean"][3], first, atol=1e-4)
    view = layer_ablation.subset(cache, {"test": 1, "test_seen_voice": 0})
    assert len(view.select(split="test")) == 1 and not view.select(split="test_seen_voice")
    assert len(view.select(split="train")) == len(cache.select(split="train"))
    assert np.allclose(layer_probes.pooled_states(view)["mean"], pooled["mean"][[cache.rows.index(r) for r in view.rows]])
    frames = layer_probes.frame_features(cache, [0, 1], 1, stride=4)
    assert frames[0].shape == (-(-cache.rows[0]["frames"] // 4), cache.d_model)


def test_comparison_and_findings():
    runs = pd.DataFrame({
        "run_id": list("abcdef"), "status": ["FINISHED"] * 6,
        "params.layer": ["0", "0", "1", "1", "last", "last"], "params.seed": ["0", "1"] * 3,
        "metrics.content.wer": [0.9, 0.8, 0.5, 0.6, 0.7, 0.7],
        "metrics.probe.gender.linear.test_seen_voice": [0.6, 0.6, 0.9, 0.9, 0.8, 0.8],
        "metrics.probe.gender.n_test.test_seen_voice": [100.0] * 6,
        "metrics.probe.gender.chance.test_seen_voice": [0.5] * 6,
    })
    t = compare.comparison(runs, ["layer"], order={"layer": ["0", "1", "last"]})
    assert list(t.index) == ["0", "1", "last"] and list(t["n_runs"]) == [2, 2, 2]
    assert t.loc["1", "content.wer"] == pytest.approx(0.55) and t.loc["1", "content.wer.std"] == pytest.approx(np.std([0.5, 0.6], ddof=1))
    t.loc["2"] = t.loc["last"]  # tiny "encoder" with 3 states: last = state 2
    (f,) = findings.probe_findings(t, 3, ["gender"])
    assert f.metrics["finding.gender.linear.test_seen_voice.best_state"] == 1
    assert f.metrics["finding.gender.linear.test_seen_voice.gap_to_last"] == pytest.approx(0.1)
    (c,) = findings.content_findings(t, "last", candidates=["0", "1", "2"])
    assert c.metrics["finding.content.wer.gap_to_last"] == pytest.approx(0.15) and "0, 1, 2: 1 0.550" in c.text and "better by 0.150" in c.text


def test_listed_points_are_one_row_each():
    runs = pd.DataFrame({
        "run_id": list("abcd"), "status": ["FINISHED"] * 4, "start_time": pd.to_datetime([3, 1, 4, 2], unit="s"),
        "params.k": ["4", "4", "1", "1"], "params.projector": ["conv", "stack", "stack", "stack"], "params.seed": ["0"] * 4,
        "metrics.content.wer": [0.6, 0.5, 0.9, 0.8],
    })
    runs, order = compare.label_points(runs, ["k", "projector"])
    assert order == {"point": ["k=4 projector=stack", "k=1 projector=stack", "k=4 projector=conv"]}  # in the order they started
    t = compare.comparison(runs, ["point"], order=order)
    assert list(t.index) == order["point"] and t.loc["k=1 projector=stack", "content.wer"] == pytest.approx(0.85)
    (f,) = findings.content_findings(t, "k=4 projector=stack")
    assert "finding.content.wer.gap_to_k_4 projector_stack" in f.metrics  # no "=" in an MLflow metric name


def test_ablation_config_is_an_alignment_config():
    cfg = layer_ablation.AblationConfig(layer="weighted", eval_every=0, weights_every=7, steps=3, whisper_baseline=True, out="x")
    a = cfg.align_config()
    assert type(a) is AlignConfig and (a.steps, a.eval_every, a.whisper_baseline, a.out) == (3, 7, False, "")
    assert layer_ablation.AblationConfig(layer=2).align_config().layer == "2" and layer_ablation.AblationConfig(layer="last").align_config().eval_every == 0
    with pytest.raises(ValueError, match="probes"):
        layer_ablation.run(layer_ablation.AblationConfig(probes="linear,svm"))


@pytest.mark.slow  # a 6-point grid through papermill: ~70 s on 2 busy cores; test_grid_point_notebook runs one point every time
def test_tiny_grid_end_to_end(tiny, tmp_path, monkeypatch):
    from omni.run.runner import run_experiment

    monkeypatch.chdir(tmp_path)  # reports/ here; MLflow: the session's throwaway sqlite store (conftest)
    root = tiny["root"]
    params = dict(corpus=str(root / "corpus"), features=str(root / "features"), lm=str(root / "lm"),
                  attributes="gender,style", attn_steps=5, weighted_steps=10, steps=2, batch_size=4,
                  warmup=0, weights_every=1, eval_clips=2, test_clips=2, seen_clips=1, max_new_tokens=12)
    Path("exp.yaml").write_text(json.dumps({
        "name": "tiny_ablation", "notebook": str(REPO / "notebooks/04_layer_ablation.ipynb"),
        "summary": str(REPO / "notebooks/05_ablation_report.ipynb"), "parameters": params,
        "grid": {"layer": ["last", "weighted"], "seed": [0]}, "headline": ["content.wer"]}))
    results = run_experiment("exp.yaml")
    assert [r.status for r in results] == ["FINISHED"] * 3, [r.error for r in results]
    *children, summary = results
    client = track.client()
    parent = client.get_run(summary.run_id)
    assert parent.info.status == "FINISHED"
    assert {client.get_run(c.run_id).data.tags["mlflow.parentRunId"] for c in children} == {summary.run_id}
    assert compare.child_runs(summary.run_id)["run_id"].nunique() == 2

    table = pd.read_csv(summary.report_dir / "comparison.csv", index_col="layer", dtype={"layer": str})
    assert list(table.index) == ["last", "weighted"]
    for c in children:
        layer = client.get_run(c.run_id).data.params["layer"]
        for key in ("content.wer", "content.test_loss", "probe.gender.linear.test_seen_voice", "probe.style.attention.test"):
            assert table.loc[layer, key] == pytest.approx(c.metrics[key]), key
    weighted = children[1].metrics
    assert abs(sum(weighted[f"content.layer_weight.{i}"] for i in range(5)) - 1) < 1e-5
    assert len(track.metric_history(children[1].run_id, "probe.gender.weight.0")) > 2  # the weight history
    findings = (summary.report_dir / "findings.md").read_text()
    assert "content.wer: lowest among last: last" in findings and "weighted: content objective: state" in findings
    assert "gender / linear / test seen voice: best state 4 (last)" in findings
    assert "grid.wall_seconds" in parent.data.metrics

    # 05 under papermill's own CLI, given the grid's parent run (as `omni run` gives it): it reads the
    # children, logs into the parent and leaves it FINISHED (the runner owns it: finish() ends nothing)
    out = papermill("05_ablation_report.ipynb", tmp_path / "05.ipynb", dict(os.environ), mlflow_run_id=summary.run_id,
                    out_dir=tmp_path / "05")
    assert out.returncode == 0, out.stderr[-3000:]
    assert client.get_run(summary.run_id).info.status == "FINISHED"
    assert (tmp_path / "05" / "findings.md").read_text() == findings


def test_grid_point_notebook(tiny, tmp_path):
    """04 under papermill's own CLI, one grid point on its own: probes and content, its own run FINISHED."""
    root = tiny["root"]
    out = papermill("04_layer_ablation.ipynb", tmp_path / "out.ipynb", papermill_env(tmp_path / "mlflow.db"),
                    corpus=root / "corpus", features=root / "features", lm=root / "lm", layer="weighted", probes="linear",
                    attributes="gender", weighted_steps=10, steps=2, batch_size=4, warmup=0, weights_every=1, eval_clips=2,
                    test_clips=2, seen_clips=1, max_new_tokens=12, out_dir=tmp_path / "run")
    assert out.returncode == 0, out.stderr[-3000:]
    run = only_run(tmp_path / "mlflow.db", "layer_ablation")
    assert run.info.status == "FINISHED"
    assert {"content.wer", "probe.gender.linear.test_seen_voice", "time.total"} <= set(run.data.metrics)


def test_last_reuses_the_finished_run_of_the_same_state():  # MLflow: the session's throwaway store (conftest)
    parent = track.start_run("alias", "grid", params={"grid": "{}"})
    common = {"k": 4, "steps": 2}
    src = track.start_run("alias", "s4", params=common | {"layer": 4, "seed": 0}, parent_run_id=parent)
    other_seed = track.start_run("alias", "s4b", params=common | {"layer": 4, "seed": 1}, parent_run_id=parent)
    t = track.Tracker(src)
    for step, v in enumerate([3.0, 2.0, 1.0]):
        t.log_metrics({"content.loss": v}, step=step)
    t.log_metrics({"content.wer": 0.5, "time.total": 99.0})
    t.flush()
    for r in (src, other_seed):
        track.end_run(r)
    last = track.start_run("alias", "last", params=common | {"layer": "last", "seed": 0}, parent_run_id=parent)
    assert compare.alias_source(last, "last", 5) == src  # not other_seed
    assert compare.alias_source(last, "middle", 5) is None  # state 2 never ran
    assert compare.alias_source(last, "4", 5) is None  # only last / middle are aliases
    copied = compare.copy_run_metrics(src, track.Tracker(last))
    assert copied == {"content.loss": 1.0, "content.wer": 0.5}  # not its cost
    assert [v for _, v in track.metric_history(last, "content.loss")] == [3.0, 2.0, 1.0]
    assert track.client().get_run(last).data.tags["omni.alias_of"] == src


def test_grid_axes_include_the_listed_points():  # MLflow: the session's throwaway store (conftest)
    points = [{"k": 4, "projector": "stack"}, {"k": 1, "projector": "stack"}, {"k": 4, "projector": "conv"}]
    parent = track.start_run("axes", "grid", params={"grid": json.dumps({"seed": [0, 1]}), "points": json.dumps(points)})
    assert compare.grid_axes(parent) == {"seed": [0, 1], "k": [4, 1], "projector": ["stack", "conv"]}
