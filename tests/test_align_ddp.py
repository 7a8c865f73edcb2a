"""Alignment under torchrun: two gloo ranks on the CPU, each training on its half of every batch,
end with the same audio path as one process training on the whole batches."""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = r"""
import json, os, sys
from safetensors.torch import save_file
from omni.experiments import alignment
from omni.experiments.alignment import AlignConfig, prepare_cache

cfg = AlignConfig(**json.loads(sys.argv[1]))
res = alignment.run(cfg, cache=prepare_cache(cfg))
state = {f"select.{k}": v for k, v in res.model.select.state_dict().items()}
state |= {f"projector.{k}": v for k, v in res.model.projector.state_dict().items()}
save_file({k: v.contiguous() for k, v in state.items()}, f"{sys.argv[2]}/rank{os.environ['RANK']}.safetensors")
"""


@pytest.mark.slow
def test_two_gloo_ranks_train_the_same_audio_path_as_one_process(tiny_alignment, tmp_path):
    from omni.experiments import alignment

    cfg = replace(tiny_alignment.cfg, steps=3, eval_every=3, eval_clips=1, max_new_tokens=2, out="", batch_size=8)
    one = alignment.run(cfg, cache=tiny_alignment.cache).model
    (tmp_path / "spy.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "spy.py"), json.dumps(asdict(cfg)), str(tmp_path)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    ref = {f"select.{k}": v for k, v in one.select.state_dict().items()}
    ref |= {f"projector.{k}": v for k, v in one.projector.state_dict().items()}
    assert set(r0) == set(ref) and len(ref) >= 2
    moved = 0
    for n in ref:
        assert torch.equal(r0[n], r1[n]), n  # the ranks agree exactly (averaged gradients)
        torch.testing.assert_close(r0[n], ref[n], atol=2e-5, rtol=1e-4)  # and match one process (float order aside)
        moved += int(not torch.equal(ref[n], torch.zeros_like(ref[n])))
    assert moved > 0
