"""A disk that fills up mid-write, simulated by a file-size limit on the process (RLIMIT_FSIZE, with
SIGXFSZ ignored, so a write past it fails with EFBIG as a full disk fails with ENOSPC): a checkpoint,
a feature shard and a report each leave the last good state, a clear error naming what was not
written, and a run that resumes. (Other faults live beside what they break: a damaged feature shard in
test_features, a port in use in test_chat, a second resume in test_resume, a BOM in test_manifest.)"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni.train import TrainConfig, train

LIMITED_TRAIN = """
import resource, signal, sys, torch
from omni.train import TrainConfig, train
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
torch.manual_seed(0)
w = torch.nn.Parameter(torch.randn(64, 64))
data = torch.randn(8, 64)
def loss_fn(step):
    if step == 3:  # after the first checkpoint: from now on no file may grow past 1 KB, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    return ((data[step] @ w) ** 2).mean(), 4
train({"w": w}, loss_fn, TrainConfig(steps=8, lr=0.1, ckpt_every=2, ckpt_dir=sys.argv[1], progress=False))
"""


def plain_run(ckpt: Path | None, steps: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64))
    data = torch.randn(8, 64)
    train({"w": w}, lambda step: (((data[step] @ w) ** 2).mean(), 4),
          TrainConfig(steps=steps, lr=0.1, ckpt_every=2 if ckpt else 0, ckpt_dir=str(ckpt or ""), progress=False))
    return w.detach()


def test_a_checkpoint_on_a_full_disk_keeps_the_last_one_says_so_and_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", LIMITED_TRAIN, str(ckpt)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert f"checkpoint {ckpt} (step 4) could not be written: File too large" in last
    assert "The last checkpoint (step 2) is intact: free space, then resume" in last
    assert json.loads((ckpt / "train_state.json").read_text())["next_step"] == 2  # the good one, whole
    assert load_file(ckpt / "train_state.safetensors")  # readable
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]  # no half-written temporaries left
    resumed = plain_run(ckpt)  # room again: the same command goes on from step 2
    assert torch.equal(resumed, plain_run(None))  # bit-identical to a run that never met a full disk


LIMITED_FEATURES = """
import resource, signal, sys
from omni.data import features
from omni.model.encoder import WhisperEncoder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
features.CLIPS_PER_SHARD = 2
real, calls = WhisperEncoder.encode, []
def encode(self, waves, **k):
    calls.append(1)
    if len(calls) == 2:  # the second shard meets a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    return real(self, waves, **k)
WhisperEncoder.encode = encode
features.build_features(sys.argv[1], sys.argv[2], progress=False)
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from omni.data.synth import SynthConfig, build_corpus

    root = tmp_path_factory.mktemp("faults")
    return build_corpus(SynthConfig(out=str(root / "corpus"), sentences=8, min_words=3, max_words=6, workers=1))


def test_a_feature_shard_on_a_full_disk_keeps_the_shards_before_and_the_rerun_finishes(corpus, tmp_path, monkeypatch):
    from omni.data import features
    from omni.data.features import FeatureCache, build_features

    rows = [json.loads(x) for x in (corpus / "manifest.jsonl").read_text().splitlines()][:4]
    rows = [r | {"audio": str(corpus / r["audio"])} for r in rows]
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", LIMITED_FEATURES, str(man), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "feature shard" in last and "shard_00001.safetensors could not be written: File too large" in last
    assert "The 1 shards before it are kept" in last
    (partial,) = out.glob(".*.partial")
    assert sorted(p.name for p in partial.iterdir()) == ["shard_00000.safetensors"]  # whole, nothing half-written
    monkeypatch.setattr(features, "CLIPS_PER_SHARD", 2)
    path = build_features(man, out, progress=False)  # room again: the same command finishes it
    assert len(FeatureCache.open(path).load_states()) == 4


def test_a_report_on_a_full_disk_fails_the_run_with_a_clear_line(tmp_path, monkeypatch):
    from omni.run import runner

    nb = tmp_path / "nb.py"
    nb.write_text('# %% tags=["parameters"]\nmlflow_run_id = ""\nout_dir = ""\n\n# %%\nx = 1\n')

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "report.html"))

    monkeypatch.setattr(runner, "_to_html", full)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    res = runner.execute(nb, {}, tmp_path / "out", "", [], {"experiment": "t", "run_name": "t"})
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert res.status == summary["status"] == "FAILED"
    assert summary["error"].startswith(f"the report of {tmp_path / 'out'} could not be written: No space left on device")
    assert "omni run --resume" in summary["error"] and (tmp_path / "out" / "notebook.ipynb").exists()
