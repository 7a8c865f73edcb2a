"""The committed LM (models/lm), what alignment, instruction tuning and the chat demo load by default:
it loads, it copies from its context (the skill a frozen LM needs to read audio tokens as words),
and it says how it was made (pretrain.json: the commit, every parameter, its figures)."""

import json
from dataclasses import asdict
from pathlib import Path

import yaml

from omni.experiments.pretrain_lm import PretrainConfig, copy_test, random_copy
from omni.model.gpt import GPT
from omni.model.lm import load_lm

REPO = Path(__file__).resolve().parents[1]
LM = REPO / "models" / "lm"
# not from the LM's text sources: sentences it cannot have memorised
PASSAGES = [
    "The ferry to the island leaves at seven, and the last one comes back before the lights go on in the harbour.",
    "She wrote the numbers on a yellow card, folded it twice, and slipped it under the blue door of the workshop.",
    "Our neighbours planted three apple trees along the fence, but only the smallest one gave fruit this autumn.",
]


def test_committed_lm_copies_what_it_just_read():
    gpt, tok = load_lm(LM)
    assert isinstance(gpt, GPT) and all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in gpt.parameters())
    first, again = copy_test(gpt, tok, PASSAGES)
    assert first > 3.0, f"read once: {first:.2f} nats/token; unseen prose should cost several nats"
    assert again < 1.0, f"read again right after: {again:.2f} nats/token; an LM that cannot copy pays about what it paid the first time"
    assert random_copy(gpt, tok.bos_id, tok.vocab_size) > 0.9  # random token spans, read again, predicted


def test_committed_lm_says_how_it_was_made():
    meta = json.loads((LM / "pretrain.json").read_text())
    assert meta["copy_nats"] <= 1.0 and meta["val_bpb"] <= 1.65 and meta["random_copy"] >= 0.9
    assert len(meta["mlflow.source.git.commit"]) == 40 and meta["train_tokens"] > 1e6
    # the recipe is what `omni run experiments/pretrain_lm.yaml` runs: the defaults and the YAML's parameters
    recipe = asdict(PretrainConfig()) | yaml.safe_load((REPO / "experiments" / "pretrain_lm.yaml").read_text())["parameters"]
    differ = {k: (v, recipe[k]) for k, v in meta["config"].items() if k not in ("out", "ckpt_dir", "device") and recipe.get(k) != v}
    assert not differ, f"models/lm was made with other settings than experiments/pretrain_lm.yaml: {differ}"
    assert sum(f.stat().st_size for f in LM.iterdir()) < 25e6
