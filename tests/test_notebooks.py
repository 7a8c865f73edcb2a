"""Notebooks 02 and 03 under papermill's own CLI (`-p NAME VALUE`, no omni runner), on tiny settings:
every cell runs, and the MLflow run the notebook starts itself holds its config's params and ends
FINISHED, or FAILED where the notebook's verdict fails.
01 runs the same way in test_params; 04-06 run through `omni run` in test_ablation / test_embedding_map."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omni import track

REPO = Path(__file__).resolve().parents[1]


def papermill(notebook: str, executed: Path, env: dict, **values) -> subprocess.CompletedProcess:
    args = [a for k, v in values.items() for a in ("-p", k, str(v))]
    return subprocess.run([sys.executable, "-m", "papermill", f"notebooks/{notebook}", str(executed), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def only_run(db: Path, experiment: str):
    old = os.environ["MLFLOW_TRACKING_URI"]
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    try:
        (run,) = track.client().search_runs([track.experiment_id(experiment)])
        return run
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture
def env(tmp_path):
    return os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def test_pretrain_notebook_under_plain_papermill(tmp_path, env):
    from omni.experiments.pretrain_lm import PretrainConfig

    res = papermill("02_pretrain_lm.ipynb", tmp_path / "out.ipynb", env, out=tmp_path / "lm", out_dir=tmp_path / "run",
                    sources="sherlock", vocab_size=300, depth=1, sequence_len=32, batch_size=4, steps=4, warmup=1,
                    eval_every=2, eval_tokens=512, device="cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "lm" / "model.safetensors").exists()
    run = only_run(tmp_path / "mlflow.db", "pretrain_lm")
    assert run.info.status == "FINISHED"
    assert {f.name for f in dataclasses.fields(PretrainConfig)} | {"out_dir"} == set(run.data.params)
    assert run.data.params["steps"] == "4" and "val_bpb" in run.data.metrics


def test_alignment_notebook_under_plain_papermill(tiny_alignment, tmp_path, env):
    res = papermill("03_alignment.ipynb", tmp_path / "out.ipynb", env, corpus=tiny_alignment.corpus,
                    features=tiny_alignment.cache.path.parent, lm=tiny_alignment.lm, out_dir=tmp_path / "run", steps=4,
                    eval_every=2, eval_clips=2, batch_size=8, max_new_tokens=8, whisper_baseline=False, device="cpu")
    # every cell runs; 4 steps on a random LM cannot beat the shuffled-audio control, so the verdict
    # (the last cell) fails, and the notebook's own run ends FAILED
    assert res.returncode != 0 and "does no better with the right audio" in res.stderr, res.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "audio_path.json").exists()
    run = only_run(tmp_path / "mlflow.db", "alignment")
    assert run.info.status == "FAILED"
    assert run.data.params["steps"] == "4" and run.data.params["lm"] == str(tiny_alignment.lm)
    assert {"wer", "control_wer"} <= set(run.data.metrics)


def test_instruct_notebook_under_plain_papermill(tiny_alignment, tmp_path, env):
    """07 on the tiny corpus: instruction data, a 4-clip hard corpus and its features are built, LoRA
    trains a few steps, both test sets are benchmarked with the three baselines, the metrics reach MLflow."""
    from conftest import tiny_lm
    from omni.experiments.instruct import InstructConfig

    lm = tiny_lm(tmp_path / "lm", sequence_len=1024)  # byte tokens: multi-turn conversations run long
    res = papermill("07_instruct.ipynb", tmp_path / "out.ipynb", env, corpus=tiny_alignment.corpus,
                    features=tiny_alignment.cache.path, lm=lm, instructions=tmp_path / "instr",
                    hard_corpus=tmp_path / "hard", hard_features=tmp_path / "features", hard_clips=4, bench_per_task=3,
                    out_dir=tmp_path / "run", steps=3, batch_size=4, warmup=0, device="cpu")
    # every cell runs; whether 3 steps beat shuffled audio is chance, and the verdict is the last cell
    assert res.returncode == 0 or "does no better with the right audio" in res.stderr, res.stderr[-3000:]
    assert (tmp_path / "instr" / "train.jsonl").is_file() and (tmp_path / "instr" / "test_hard.jsonl").is_file()
    assert (tmp_path / "run" / "model" / "lora.safetensors").is_file()
    for name in ("test", "test_hard"):
        assert (tmp_path / "run" / f"bench_{name}" / "bench.png").stat().st_size > 1000
    run = only_run(tmp_path / "mlflow.db", "instruct")
    if res.returncode == 0:
        assert run.info.status == "FINISHED"
    assert {f.name for f in dataclasses.fields(InstructConfig)} | {"out_dir"} == set(run.data.params)
    assert {"texture_mean", "texture_chance_mean", "transcript_only_texture_mean", "hard_texture_mean", "transcribe_wer",
            "hard_transcribe_wer", "meets_bar", "loss"} <= set(run.data.metrics)
    html = (tmp_path / "out.ipynb").read_text()
    assert "hears" in html and "transcription through chat" in html
