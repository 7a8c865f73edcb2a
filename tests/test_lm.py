"""omni.model.lm: one interface over three backbones (omni GPT folder, nanochat checkpoint, Hugging Face
causal LM). Each loads from disk, keeps omni's left-padding semantics, decodes the same with and
without its KV cache, and takes an aligned projector through omni.experiments.alignment unchanged.
A nanochat tokenizer pickle that tries to run code is refused."""

import os
import pickle
from dataclasses import replace

import pytest
import torch
from conftest import tiny_hf_lm, tiny_lm, tiny_nanochat

from omni.model.lm import lm_kind, load_lm


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {
        "omni": tiny_lm(root / "omni"),
        "nanochat": tiny_nanochat(root / "nanochat"),
        "hf": tiny_hf_lm(root / "hf"),
        "hf-llama": tiny_hf_lm(root / "llama", arch="llama"),
    }


KINDS = ["omni", "nanochat", "hf"]
ALL = KINDS + ["hf-llama"]


@pytest.mark.parametrize("kind", ALL)
def test_load_lm_recognises_the_folder(backbones, kind):
    assert lm_kind(backbones[kind]) == kind.split("-")[0]
    lm, tok = load_lm(backbones[kind])
    assert lm.config.vocab_size >= tok.vocab_size > 0
    ids = tok.encode("the fox", bos=True)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "the fox"
    assert lm.embed(torch.tensor([ids])).shape == (1, len(ids), lm.config.n_embd)


def test_nanochat_weights_map_onto_omni_gpt_exactly(backbones, tmp_path):
    from omni.model.gpt import GPT

    lm, tok = load_lm(backbones["nanochat"])
    assert isinstance(lm, GPT) and lm.config.vocab_size == tok.vocab_size == 265  # padding (320) cropped
    state = torch.load(next(backbones["nanochat"].glob("model_*.pt")), weights_only=True)
    ref = GPT(lm.config)
    ref.load_state_dict({k: v[:265].float() if v.size(0) == 320 else v.float() for k, v in state.items()})
    idx = torch.tensor([tok.encode("Holmes", bos=True)])
    torch.testing.assert_close(lm(idx), ref(idx), atol=0, rtol=0)
    assert tok.bos_id == 256 and tok.eos_id == tok.bos_id  # nanochat's <|bos|> delimits documents


def test_later_nanochat_formats_load_or_are_refused_by_what_they_hold(backbones, tmp_path):
    """The ccf4b7f-era checkpoint given aa530cd's lambdas (2026-01-11): one of the two is no nanochat format;
    both without a window_pattern is ambiguous (aa530cd's base, or a mid/SFT checkpoint of 2026-01 that lost
    its windows); told "L", it loads, and neutral lambdas compute what the ccf4b7f checkpoint computes.
    (Today's formats, against nanochat's own code: tests/test_nanochat.py.)"""
    import json
    import shutil

    ckpt = tmp_path / "base_checkpoints" / "d1"
    shutil.copytree(backbones["nanochat"].parent.parent, tmp_path, dirs_exist_ok=True)
    f, meta = next(ckpt.glob("model_*.pt")), next(ckpt.glob("meta_*.json"))
    state = torch.load(f, weights_only=True)
    state["resid_lambdas"] = torch.ones(1)
    torch.save(state, f)
    with pytest.raises(ValueError, match="missing keys.*x0_lambdas"):
        load_lm(ckpt)
    state["x0_lambdas"] = torch.zeros(1)
    torch.save(state, f)
    with pytest.raises(ValueError, match="no window_pattern"):
        load_lm(ckpt)
    m = json.loads(meta.read_text())
    m["model_config"]["window_pattern"] = "L"
    meta.write_text(json.dumps(m))
    lm, tok = load_lm(ckpt)
    old, _ = load_lm(backbones["nanochat"])
    assert lm.config.lambdas and not old.config.lambdas
    idx = torch.tensor([tok.encode("Holmes", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(lm(idx), old(idx), atol=1e-6, rtol=0)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['OMNI_EVIL_MARK']}",))


def test_malicious_tokenizer_pickle_is_refused(backbones, tmp_path, monkeypatch):
    import shutil

    from omni.model.nanochat import NanochatTokenizer

    mark = tmp_path / "pwned"
    monkeypatch.setenv("OMNI_EVIL_MARK", str(mark))
    base = tmp_path / "nc"
    shutil.copytree(backbones["nanochat"].parent.parent, base)
    (base / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        NanochatTokenizer.load(base / "tokenizer")
    with pytest.raises(pickle.UnpicklingError):
        load_lm(base / "base_checkpoints" / "d1")
    assert not mark.exists()
    pickle.loads(pickle.dumps(Evil()))  # the same pickle, plainly unpickled, does run code:
    assert mark.exists()  # so the refusal above is what kept it from running


def _prefix(lm, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(B, 5, lm.config.n_embd, generator=g) * lm.embed(torch.arange(10)[None]).float().std()
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[1, :2] = False  # left padding of different lengths
    mask[2, :4] = False
    return audio, mask


@pytest.mark.parametrize("kind", ALL)
def test_cached_and_uncached_decoding_agree(backbones, kind):
    lm, tok = load_lm(backbones[kind])
    lm.eval()
    audio, mask = _prefix(lm)
    idx = torch.tensor([[tok.bos_id]] * 3)
    a = lm.generate(idx, audio=audio, audio_mask=mask, max_new_tokens=8)
    b = lm.generate(idx, audio=audio, audio_mask=mask, max_new_tokens=8, use_cache=False)
    assert a.shape == (3, 8)
    assert torch.equal(a, b)
    if hasattr(lm, "stream"):  # omni's GPT gains `stream` on another branch; HFLM has it here
        assert torch.equal(torch.stack(list(lm.stream(idx, audio, mask, 8)), dim=1), a)


@pytest.mark.parametrize("kind", ALL)
def test_left_padded_batch_equals_each_sample_alone(backbones, kind):
    lm, tok = load_lm(backbones[kind])
    lm.eval()
    audio, mask = _prefix(lm)
    idx = torch.tensor([tok.encode("the fox", bos=True)] * 3)
    with torch.no_grad():
        batch = lm(idx, audio=audio, audio_mask=mask)
        for i in range(3):
            alone = lm(idx[i : i + 1], audio=audio[i : i + 1, mask[i]], audio_mask=None)
            torch.testing.assert_close(batch[i], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ALL)
def test_a_head_read_once_goes_on_in_copies_as_a_prefill_would(backbones, kind):
    """The chat reads a clip once (extend with no text) and each question about it goes on in a copy of
    that cache (extend with all but its last token, then step): the logits a prefill of the whole
    prompt gives, question after question, the head untouched by the questions before."""
    lm, tok = load_lm(backbones[kind])
    lm.eval()
    audio = _prefix(lm)[0][:1]
    head = lm.new_cache(1, audio.size(1))
    with torch.no_grad():
        assert lm.extend(head, torch.zeros(1, 0, dtype=torch.long), audio) is None
        for question in ("the fox", "a question of three", "x"):
            idx = torch.tensor([tok.encode(question, bos=True)])
            want, _ = lm.prefill(idx, audio, None, 4)
            cache = head.copy(audio.size(1) + idx.size(1) + 4)
            if idx.size(1) > 1:
                lm.extend(cache, idx[:, :-1])
            got = lm.step(idx[0, -1:], cache)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            nxt = got.argmax(-1)
            torch.testing.assert_close(lm.step(nxt, cache), lm.prefill(torch.cat([idx, nxt[None]], 1), audio, None, 4)[0], atol=1e-4, rtol=1e-4)
        text = torch.tensor([tok.encode("the fox jumps", bos=True)])  # no head: a fresh cache
        empty = lm.new_cache(1, text.size(1) + 2)
        torch.testing.assert_close(lm.extend(empty, text), lm.prefill(text, None, None, 2)[0], atol=1e-4, rtol=1e-4)


def test_hf_tokenizer_chat_template(backbones):
    _, tok = load_lm(backbones["hf"])
    ids = tok.chat_ids("Transcribe:")
    assert tok.tok.decode(ids) == "<|im_start|>user\nTranscribe:<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_id == tok.tok.convert_tokens_to_ids("<|im_end|>")


def test_k_bit_is_refused_without_cuda_before_loading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="load_in"):
        load_lm(tmp_path / "does-not-exist", load_in="4bit")


@pytest.mark.parametrize("kind", KINDS)
def test_alignment_runs_on_every_backbone(tiny_alignment, backbones, kind, tmp_path):
    """A few projector steps into each LM through omni.experiments.alignment, then greedy decoding (cached == uncached)."""
    from omni.experiments.alignment import run as run_alignment
    from omni.model.encoder import collate_states

    cfg = replace(tiny_alignment.cfg, lm=str(backbones[kind]), steps=4, eval_every=4, eval_clips=2, layer="last",
                  max_new_tokens=6, out="")
    res = run_alignment(cfg, cache=tiny_alignment.cache)
    assert len(res.history.loss) == 4 and all(torch.isfinite(torch.tensor(res.history.loss)))
    assert res.history.loss[-1] < res.history.loss[0]  # the projector learned something
    assert len(res.test.hyps) == len(res.test.refs) > 0
    model = res.model
    rows = tiny_alignment.cache.select(split="test")[:3]
    hidden, lengths = collate_states([s.float() for s in tiny_alignment.cache.load_states(rows)])
    prefix, mask = model.prefix(hidden, lengths)
    idx = torch.tensor([[model.tokenizer.bos_id]] * len(rows))
    a = model.gpt.generate(idx, audio=prefix, audio_mask=mask, max_new_tokens=6)
    b = model.gpt.generate(idx, audio=prefix, audio_mask=mask, max_new_tokens=6, use_cache=False)
    assert torch.equal(a, b)


def test_hub_ids_and_missing_local_folders_are_told_apart(tmp_path, monkeypatch):
    from omni.model.lm import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("meta-llama/Llama-3.2-1B")
    # runs/lm in a fresh checkout (no runs/ yet) is where the default LM gets pretrained, not a hub id
    assert not is_hub_id("runs/lm") and not is_hub_id("models/lm") and not is_hub_id("mine/lm") and not is_hub_id("./x") and not is_hub_id("a/b/c")


@pytest.mark.parametrize("kind", KINDS)
def test_save_lm_round_trips(backbones, kind, tmp_path):
    """What a projector+lm run writes as its own LM copy loads back to the same model and tokenizer."""
    from omni.model.lm import save_lm

    lm, tok = load_lm(backbones[kind])
    lm.eval()
    save_lm(lm, tok, tmp_path / "copy")
    again, tok2 = load_lm(tmp_path / "copy")
    again.eval()
    idx = torch.tensor([tok.encode("the lazy dog", bos=True)])
    assert tok2.encode("the lazy dog", bos=True) == idx[0].tolist() and tok2.eos_id == tok.eos_id
    with torch.no_grad():
        torch.testing.assert_close(again(idx), lm(idx), atol=0, rtol=0)
