"""omni.nanochat against nanochat's own code: every fixture under tests/fixtures/nanochat/<commit>/ was written,
read back and run by nanochat at that commit (make_fixtures.py). omni's loader must reproduce nanochat's
logits (1e-4, fp32, CPU) and greedy tokens, decode the same through its KV cache (smear's previous
embedding, sliding windows), and refuse what no nanochat period wrote, naming the key."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omni.model.kvcache import KVCache
from omni.model.lm import lm_kind, load_lm
from omni.model.nanochat import recognise

FIXTURES = Path(__file__).parent / "fixtures" / "nanochat"
COMMITS = sorted(d.name for d in FIXTURES.iterdir() if (d / "expected.json").exists())
HEAD = "92d63d4"
AMBIGUOUS = {"e85db6b": 15, "aba30cb": 20}  # P3: the softcap each was written with (the checkpoint cannot tell)

# what each period maps onto (the module docstring's table): commit -> GPTConfig fields
PERIODS = {
    "ccf4b7f": dict(lambdas=False, value_embeds=False, smear=False, backout=False, rope_base=1e4, qk_scale=1.0,
                    softcap=15.0, window_pattern="L", short_window=0, rotary_bf16=True),
    "b62a5bc": dict(lambdas=True, value_embeds=False, smear=False, rope_base=1e4, qk_scale=1.0, softcap=15.0,
                    window_pattern="SSSL", short_window=128, rotary_bf16=True),
    "e85db6b": dict(lambdas=True, value_embeds=True, ve_gate_channels=32, ve_gate_scale=2.0, smear=False, rope_base=1e4,
                    qk_scale=1.0, softcap=15.0, short_window=128, rotary_bf16=True),
    "aba30cb": dict(lambdas=True, value_embeds=True, ve_gate_channels=32, ve_gate_scale=2.0, softcap=20.0, short_window=128),
    "6ed7d1d": dict(lambdas=True, value_embeds=True, ve_gate_channels=12, ve_gate_scale=3.0, smear=False, backout=False,
                    rope_base=1e5, qk_scale=1.15, softcap=15.0, short_window=128, rotary_bf16=False),
    HEAD: dict(lambdas=True, value_embeds=True, ve_gate_channels=12, ve_gate_scale=3.0, smear=True, smear_channels=24,
               backout=True, rope_base=1e5, qk_scale=1.2, softcap=15.0, window_pattern="SSSL", short_window=128,
               rotary_bf16=False),
}


def test_the_required_fixtures_are_here():
    assert {"ccf4b7f", HEAD} <= set(COMMITS), f"fixtures present: {COMMITS}"


def fixture(commit: str, tmp_path: Path) -> Path:
    """The fixture folder; for a P3 commit a copy whose meta says its softcap (as a user would add it)."""
    d = FIXTURES / commit
    if commit not in AMBIGUOUS:
        return d
    shutil.copytree(d, tmp_path / commit)
    meta = tmp_path / commit / "meta_000000.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"softcap": AMBIGUOUS[commit]}))
    return tmp_path / commit


def expected(commit: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / commit / "expected.safetensors")


@pytest.mark.parametrize("commit", COMMITS)
def test_loader_reproduces_nanochats_logits_and_greedy_tokens(commit, tmp_path):
    exp = expected(commit)
    info = json.loads((FIXTURES / commit / "expected.json").read_text())
    assert info["commit"].startswith(commit) and exp["tokens"].tolist() == info["tokens"]
    path = fixture(commit, tmp_path)
    assert lm_kind(path) == "nanochat"
    lm, tok = load_lm(path)
    lm.eval()
    assert lm.config.vocab_size == tok.vocab_size == 300  # 320 padded rows cropped, value embeddings too
    assert all(p.dtype == torch.float32 for p in lm.parameters())  # wte / value_embeds were stored in bf16
    assert tok.encode(info["text"], bos=True)[: len(info["tokens"])] == info["tokens"]
    with torch.no_grad():
        logits = lm(exp["tokens"][None])[0, exp["positions"]]
    assert (logits - exp["logits"]).abs().max().item() < 1e-4
    prompt = exp["prompt"][None]
    for use_cache in (False, True):
        greedy = lm.generate(prompt, max_new_tokens=len(info["greedy"]), use_cache=use_cache)
        assert greedy[0].tolist() == info["greedy"], f"use_cache={use_cache}"


@pytest.mark.parametrize("commit", COMMITS)
def test_kv_cache_decodes_step_by_step_as_nanochat_computes(commit, tmp_path):
    """Prefill, one chunk, then one token at a time through omni's KV cache: every step's logits equal
    nanochat's full forward (positions 140..159 lie past the 128-key short window; smear reads the cached
    previous embedding)."""
    exp = expected(commit)
    lm, _ = load_lm(fixture(commit, tmp_path))
    lm.eval()
    tokens, positions = exp["tokens"][None], exp["positions"].tolist()
    T = tokens.size(1)
    with torch.no_grad():
        full = lm(tokens)[0]
        cache = KVCache(1, T)
        steps = [lm(tokens[:, :100], kv_cache=cache)[0], lm(tokens[:, 100:140], kv_cache=cache)[0]]
        steps += [lm(tokens[:, t : t + 1], kv_cache=cache)[0] for t in range(140, T)]
    cached = torch.cat(steps)
    assert (cached - full).abs().max().item() < 1e-4
    assert (cached[positions] - exp["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("commit", COMMITS)
def test_each_fixture_is_recognised_as_its_period(commit, tmp_path):
    state = torch.load(FIXTURES / commit / "model_000000.pt", weights_only=True)
    mc = json.loads((FIXTURES / commit / "meta_000000.json").read_text())["model_config"]
    _, cfg = recognise(state, mc, AMBIGUOUS.get(commit))
    assert {k: getattr(cfg, k) for k in PERIODS[commit]} == PERIODS[commit]


# --- what the loader refuses, and what it tolerates ----------------------------------------------------


def edited(tmp_path: Path, commit: str = HEAD, state_edit=None, meta_edit=None) -> Path:
    """A copy of a fixture with its state dict and/or meta JSON changed."""
    d = tmp_path / f"edited-{commit}"
    shutil.copytree(FIXTURES / commit, d)
    if state_edit:
        state = torch.load(d / "model_000000.pt", weights_only=True)
        state_edit(state)
        torch.save(state, d / "model_000000.pt")
    if meta_edit:
        meta = json.loads((d / "meta_000000.json").read_text())
        meta_edit(meta)
        (d / "meta_000000.json").write_text(json.dumps(meta))
    return d


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


@pytest.mark.parametrize("state_edit, meta_edit, named", [
    (_set("attn_gate.weight", torch.zeros(2, 12)), None, "attn_gate.weight"),  # a key no period has
    (_set("transformer.h.1.attn.ve_gate.weight", torch.zeros(2, 16)), None, "transformer.h.1.attn.ve_gate.weight"),
    (_set("transformer.h.3.attn.ve_gate.weight", torch.zeros(2, 32)), None, "transformer.h.3.attn.ve_gate.weight"),  # mixed 12 / 32
    (_set("value_embeds.0.weight", torch.zeros(320, 16)), None, "value_embeds.0.weight"),  # a layer nanochat gives none
    (_set("smear_gate.weight", torch.zeros(1, 32)), None, "smear_gate.weight"),
    (lambda s: s.pop("backout_lambda"), None, "backout_lambda"),
    (_set("bigram_lambdas", torch.zeros(4)), None, "engram"),  # recognised, not implemented
    (_set("v0_lambdas", torch.zeros(4)), None, "v0_lambdas"),
    (None, lambda m: m["model_config"].update(mlp_ratio=4), "mlp_ratio"),  # a config field no period has
    (None, lambda m: m["model_config"].pop("window_pattern"), "window_pattern"),  # an SFT of 2026-01 lost it
    (None, lambda m: m.update(softcap=20), "softcap"),  # P5's softcap is 15, whatever a user says
])
def test_unknown_formats_are_refused_naming_what_differs(tmp_path, state_edit, meta_edit, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_lm(edited(tmp_path, state_edit=state_edit, meta_edit=meta_edit))


def test_the_p3_softcap_must_be_told_and_is_then_used(tmp_path):
    commit = "e85db6b"
    if commit not in COMMITS:
        pytest.skip(f"no {commit} fixture")
    with pytest.raises(ValueError, match="softcap"):
        load_lm(FIXTURES / commit)
    exp = expected(commit)
    with torch.no_grad():
        logits = {cap: load_lm(edited(tmp_path / str(cap), commit, meta_edit=lambda m, c=cap: m.update(softcap=c)))[0]
                  .eval()(exp["tokens"][None])[0, exp["positions"]] for cap in (15, 20)}
    assert (logits[15] - exp["logits"]).abs().max() < 1e-4 < (logits[20] - exp["logits"]).abs().max()
    assert torch.equal(logits[15].argmax(-1), logits[20].argmax(-1))  # monotonic: the same greedy choices


def test_compile_prefix_and_unpadded_vocabulary_load_the_same(tmp_path):
    """torch.compile's `_orig_mod.` prefix is stripped; a vocabulary stored unpadded (nanochat before
    2025-12-09) loads as the padded one does."""
    def rewrite(state):
        for k in list(state):
            v = state.pop(k)
            state["_orig_mod." + k] = v[:300] if v.size(0) == 320 else v

    exp = expected(HEAD)
    lm, _ = load_lm(edited(tmp_path, state_edit=rewrite))
    with torch.no_grad():
        assert (lm.eval()(exp["tokens"][None])[0, exp["positions"]] - exp["logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("commit", COMMITS)
def test_short_window_formula_is_nanochats(commit):
    """nanochat's own per-layer windows at several sequence lengths (recorded by make_fixtures.py from its
    _compute_window_sizes) against omni's: a window (W, 0) with W = sequence_len is omni's full window."""
    recorded = json.loads((FIXTURES / commit / "expected.json").read_text())["window_sizes"]
    if not recorded:
        pytest.skip(f"nanochat {commit} has no sliding windows")
    state = torch.load(FIXTURES / commit / "model_000000.pt", weights_only=True)
    mc = json.loads((FIXTURES / commit / "meta_000000.json").read_text())["model_config"]
    for seq, sizes in recorded.items():
        _, cfg = recognise(state, mc | {"sequence_len": int(seq)}, AMBIGUOUS.get(commit))
        assert cfg.windows() == [0 if w == int(seq) else w for w in sizes], f"sequence_len {seq}"
