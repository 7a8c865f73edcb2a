"""LoRA through peft on omni's GPT and on a Hugging Face LM: a fresh adapter changes nothing, a
trained one does; adapters save as safetensors, load onto a fresh backbone with the same outputs,
and merge into the base weights; `trainable=projector+lora` trains only adapters + audio path."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_hf_lm, tiny_lm

from omni.model.lm import LoraSpec, add_lora, load_lm, load_lora, lora_parameters, merge_lora, save_lora


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"omni": tiny_lm(root / "omni"), "hf": tiny_hf_lm(root / "hf")}


def _logits(lm, tok):
    idx = torch.tensor([tok.encode("the quick fox", bos=True)])
    with torch.no_grad():
        return lm(idx)


@pytest.mark.parametrize("kind", ["omni", "hf"])
def test_lora_save_load_merge(lms, kind, tmp_path):
    lm, tok = load_lm(lms[kind])
    lm.eval()
    base = _logits(lm, tok)
    n_base = sum(p.numel() for p in lm.parameters())
    params = add_lora(lm, LoraSpec(rank=4, alpha=8.0))
    # default targets: every attention and MLP projection (q, k, v, attn c_proj, c_fc, mlp c_proj per GPT block; 7 per Llama/Qwen block)
    per_block = 6 if kind == "omni" else 7
    n_layers = len(lm.transformer.h) if kind == "omni" else lm.model.config.num_hidden_layers
    assert len(params) == 2 * per_block * n_layers
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    assert 0 < sum(p.numel() for p in params.values()) < n_base
    torch.testing.assert_close(_logits(lm, tok), base)  # lora_B starts at zero: nothing changes
    with torch.no_grad():
        for n, p in params.items():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    tuned = _logits(lm, tok)
    assert not torch.allclose(tuned, base, atol=1e-3)
    save_lora(lm, LoraSpec(rank=4, alpha=8.0), tmp_path)
    assert json.loads((tmp_path / "lora.json").read_text())["rank"] == 4

    fresh, _ = load_lm(lms[kind])
    fresh.eval()
    spec = load_lora(fresh, tmp_path)
    assert spec.rank == 4
    torch.testing.assert_close(_logits(fresh, tok), tuned)
    merge_lora(fresh)
    assert not lora_parameters(fresh)
    torch.testing.assert_close(_logits(fresh, tok), tuned, atol=1e-4, rtol=1e-4)


def test_lora_targets_that_name_nothing_are_refused(lms):
    lm, _ = load_lm(lms["omni"])
    with pytest.raises(ValueError, match="lora_targets"):
        add_lora(lm, LoraSpec(targets="q_proj"))


def test_alignment_with_lora_trains_adapters_not_the_base(tiny_alignment, lms, tmp_path):
    from omni.experiments import alignment
    from omni.experiments.audio_run import load_run

    cfg = replace(tiny_alignment.cfg, lm=str(lms["hf"]), trainable="projector+lora", lora_rank=4, steps=3,
                  eval_every=3, eval_clips=2, max_new_tokens=4, out=str(tmp_path / "run"))
    res = alignment.run(cfg, cache=tiny_alignment.cache)
    original, _ = load_lm(lms["hf"])
    trained = res.model.gpt
    after = {n.replace(".base_layer", ""): p for n, p in trained.named_parameters() if "lora_" not in n}
    base_changed = [n for n, p in original.named_parameters() if not torch.equal(p, after[n])]
    assert base_changed == []
    lora = lora_parameters(trained)
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # the adapters moved
    assert (tmp_path / "run" / "lora.safetensors").exists()
    model, _ = load_run(tmp_path / "run")
    for n, p in lora_parameters(model.gpt).items():
        assert torch.equal(p, lora[n])
