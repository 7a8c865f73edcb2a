import math

import pytest
import torch
import torch.nn.functional as F

from omni.model.gpt import GPT, GPTConfig

TINY = dict(sequence_len=64, vocab_size=37, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)  # GQA on


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**(TINY | kw)))


def decisive(model: GPT, seed: int = 0) -> GPT:
    """Random output layers instead of the near-zero init, so logits have clear winners
    (a fresh model is ~uniform and its argmax is decided by rounding noise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name or "lm_head" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 3 / math.sqrt(p.size(1)))
    return model


def padded_batch(model: GPT, lens: list[int], T: int, seed: int = 0):
    """idx (B, T), audio (B, A, D) left-padded with garbage, audio_mask (B, A), and the unpadded audios."""
    g = torch.Generator().manual_seed(seed)
    B, A, D = len(lens), max(lens), model.config.n_embd
    idx = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    audio = torch.randn(B, A, D, generator=g) * 7  # padding garbage: must not matter
    mask = torch.zeros(B, A, dtype=torch.bool)
    for b, n in enumerate(lens):
        mask[b, A - n :] = True
    return idx, audio, mask


def test_config_from_depth():
    c = GPTConfig.from_depth(6)
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.vocab_size) == (6, 6, 6, 384, 257)
    assert GPTConfig.from_depth(4, vocab_size=4096, sequence_len=256).sequence_len == 256
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4)


def test_fresh_loss_is_ln_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=257, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    idx = torch.randint(0, 257, (4, 32))
    loss = model(idx, targets=torch.roll(idx, -1, 1))
    assert abs(loss.item() - math.log(257)) < 0.3


def test_logits_shape_and_dtype():
    model = tiny()
    idx = torch.randint(0, 37, (2, 5))
    logits = model(idx, audio=torch.randn(2, 3, 32))
    assert logits.shape == (2, 5, 37) and logits.dtype == torch.float32
    assert logits.abs().max() <= model.config.softcap
    assert model.embed(idx).pow(2).mean(-1).sqrt().allclose(torch.ones(2, 5), atol=1e-4)  # unit RMS


def test_too_long_raises():
    model = tiny()
    with pytest.raises(ValueError, match="sequence_len"):
        model(torch.zeros(1, 60, dtype=torch.long), audio=torch.randn(1, 10, 32))
    with pytest.raises(ValueError, match="sequence_len"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=60)
    with pytest.raises(ValueError, match="LEFT"):
        model(torch.zeros(1, 2, dtype=torch.long), audio=torch.randn(1, 2, 32), audio_mask=torch.tensor([[True, False]]))


def test_left_padded_batch_matches_each_sample_alone():
    model = decisive(tiny())
    lens, T = [5, 2, 0, 3], 6
    idx, audio, mask = padded_batch(model, lens, T)
    targets = torch.randint(0, 37, (len(lens), T))
    targets[1, :2] = -1
    logits = model(idx, audio=audio, audio_mask=mask)
    A = audio.size(1)
    for b, n in enumerate(lens):
        alone_audio = audio[b : b + 1, A - n :] if n else None
        alone = model(idx[b : b + 1], audio=alone_audio)
        torch.testing.assert_close(logits[b : b + 1], alone, atol=1e-4, rtol=0)
        loss_b = model(idx[b : b + 1], targets=targets[b : b + 1], audio=audio[b : b + 1], audio_mask=mask[b : b + 1])
        loss_alone = model(idx[b : b + 1], targets=targets[b : b + 1], audio=alone_audio)
        torch.testing.assert_close(loss_b, loss_alone, atol=1e-4, rtol=0)
    # NaN in a padded slot must not leak into anything
    audio[1, 0] = float("nan")
    assert torch.isfinite(model(idx, audio=audio, audio_mask=mask)).all()


def test_loss_ignores_minus_one_and_audio_positions():
    model = decisive(tiny())
    idx = torch.randint(0, 37, (2, 6))
    audio = torch.randn(2, 4, 32)
    targets = torch.randint(0, 37, (2, 6))
    targets[0, 3:] = -1
    targets[1, :2] = -1
    logits = model(idx, audio=audio)
    keep = targets != -1
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(model(idx, targets=targets, audio=audio), expected)
    # changing ignored targets changes nothing
    t2 = targets.clone()
    t2[~keep] = -1
    torch.testing.assert_close(model(idx, targets=t2, audio=audio), expected)
    # the lm_head never runs on audio positions: count its rows of input
    seen = []
    h = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    model(idx, targets=targets, audio=audio)
    h.remove()
    assert seen == [6]


def test_gradient_flows_into_audio():
    for model in (tiny(), decisive(tiny())):  # fresh init too: small, not zero, output layers
        idx = torch.randint(0, 37, (2, 5))
        audio = torch.randn(2, 4, 32, requires_grad=True)
        mask = torch.tensor([[False, True, True, True], [True] * 4])
        model(idx, targets=idx, audio=audio, audio_mask=mask).backward()
        assert torch.isfinite(audio.grad).all()
        assert audio.grad[:, 1:].abs().sum() > 0
        assert audio.grad[0, 0].abs().sum() == 0  # a padded slot gets no gradient


@pytest.mark.parametrize("with_audio", [False, True])
def test_cached_generation_equals_uncached(with_audio: bool):
    model = decisive(tiny())
    lens = [4, 1, 6] if with_audio else [0, 0, 0]
    idx, audio, mask = padded_batch(model, lens, T=3, seed=1)
    kw = dict(audio=audio, audio_mask=mask) if with_audio else {}
    a = model.generate(idx, max_new_tokens=12, use_cache=True, **kw)
    b = model.generate(idx, max_new_tokens=12, use_cache=False, **kw)
    assert a.shape == (3, 12)
    assert torch.equal(a, b)
    if with_audio:  # each sample alone (no padding) generates the same tokens
        for i, n in enumerate(lens):
            alone = model.generate(idx[i : i + 1], audio=audio[i : i + 1, audio.size(1) - n :], max_new_tokens=12)
            assert torch.equal(alone, a[i : i + 1])
    # sampling with a cache also matches sampling without, given a seed
    c = model.generate(idx, max_new_tokens=12, temperature=1.0, seed=3, use_cache=True, **kw)
    d = model.generate(idx, max_new_tokens=12, temperature=1.0, seed=3, use_cache=False, **kw)
    assert torch.equal(c, d)


def test_stop_token_pads_and_stops_early():
    model = decisive(tiny())
    idx = torch.randint(0, 37, (3, 4))
    greedy = model.generate(idx, max_new_tokens=10)
    stop = int(greedy[0, 0])  # sample 0 emits it first
    out = model.generate(idx, max_new_tokens=10, stop_token=stop)
    assert out.shape[1] <= 10 and (out[0] == stop).all()
    for row, ref in zip(out, greedy):  # same as greedy up to the first stop, then only stops
        hits = (ref == stop).nonzero()
        first = int(hits[0, 0]) if len(hits) else 10
        assert torch.equal(row[:first], ref[:first]) and (row[first:] == stop).all()
    # every sample stopped -> generation ends early
    assert model.generate(idx[:1], max_new_tokens=10, stop_token=stop).shape == (1, 1)


def test_sampling_controls():
    model = decisive(tiny())
    idx = torch.randint(0, 37, (2, 4))
    audio = torch.randn(2, 3, 32)
    greedy = model.generate(idx, audio=audio, max_new_tokens=10)
    assert torch.equal(model.generate(idx, audio=audio, max_new_tokens=10, temperature=1.0, top_k=1, seed=0), greedy)
    assert torch.equal(model.generate(idx, audio=audio, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=0), greedy)
    a = model.generate(idx, audio=audio, max_new_tokens=10, temperature=2.0, top_p=0.9, seed=7)
    b = model.generate(idx, audio=audio, max_new_tokens=10, temperature=2.0, top_p=0.9, seed=7)
    c = model.generate(idx, audio=audio, max_new_tokens=10, temperature=2.0, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_save_load_roundtrip(tmp_path):
    model = decisive(tiny())
    model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = GPT.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    idx, audio, mask = padded_batch(model, [3, 1], T=5)
    assert torch.equal(model(idx, audio=audio, audio_mask=mask), loaded(idx, audio=audio, audio_mask=mask))


def test_overfits_a_couple_of_sequences():
    model = tiny()
    torch.manual_seed(0)
    idx = torch.randint(0, 37, (2, 17))
    audio = torch.randn(2, 3, 32)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(30):
        loss = model(x, targets=y, audio=audio)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first, (first, loss.item())


def test_bf16_autocast_cpu():
    # the dtype plumbing GPU training uses (bf16 activations, fp32 params, bf16 kv cache)
    model = decisive(tiny())
    idx, audio, mask = padded_batch(model, [3, 1], T=5)
    audio.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, targets=idx, audio=audio, audio_mask=mask)
        logits = model(idx, audio=audio, audio_mask=mask)
        out = model.generate(idx, audio=audio, audio_mask=mask, max_new_tokens=4)
    loss.backward()
    assert logits.dtype == torch.float32 and torch.isfinite(loss) and out.shape == (2, 4)
    assert torch.isfinite(audio.grad).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_cuda():
    model = decisive(tiny()).cuda()
    idx, audio, mask = (t.cuda() for t in padded_batch(model, [3, 1], T=5))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(idx, targets=idx, audio=audio, audio_mask=mask)
        out = model.generate(idx, audio=audio, audio_mask=mask, max_new_tokens=4)
    loss.backward()
    assert torch.isfinite(loss) and out.shape == (2, 4)


def test_half_precision_save_loads_as_float32(tmp_path):
    cfg = dict(smear=True, smear_channels=8, lambdas=True, value_embeds=True, ve_gate_channels=8, backout=True)
    model = decisive(tiny(**cfg))
    model.save(tmp_path / "fp16", dtype=torch.float16)
    model.save(tmp_path / "fp32")
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "fp16" / "model.safetensors").values())
    half, full = GPT.load(tmp_path / "fp16"), GPT.load(tmp_path / "fp32")
    assert all(p.dtype == torch.float32 for p in half.parameters())
    idx = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        assert torch.equal(full(idx), model(idx))  # float32 round trip: exact
        diff = (half(idx) - model(idx)).abs().max().item()
    assert 0 < diff < 0.05  # rounded to fp16, not bit-equal, but close


@pytest.mark.parametrize("later,room", [(False, 64), (True, 64), (True, 2)])
def test_step_many_equals_stepping_each_cache_alone(later: bool, room: int):
    """Three sequences started apart (different prompts, prefixes and lengths), stepped as one batch, then
    one of them alone while the other two go on together, then all three again (the batch kept, remade,
    and, with room 2, outgrown): the same logits as each stepped alone, and each cache left as its own
    steps would leave it. later: nanochat's later parts (smear, smeared keys, value embeddings, sliding
    windows) on."""
    extra = dict(smear=True, smear_channels=8, smear_keys=True, value_embeds=True, ve_gate_channels=8, lambdas=True,
                 window_pattern="SL", short_window=3) if later else {}
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=16, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    starts = [(torch.randint(0, 50, (1, n)), torch.randn(1, a, 16) if a else None) for n, a in ((3, 4), (7, 0), (1, 9))]

    def fresh():
        return [model.prefill(idx, audio, None, 9) for idx, audio in starts]

    alone, together = fresh(), fresh()
    caches = [cache for _, cache in together]
    tokens = torch.stack([logits.argmax(-1) for logits, _ in alone]).flatten()
    for step in range(9):
        want = torch.cat([model.step(tokens[i : i + 1], cache) for i, (_, cache) in enumerate(alone)])
        if 3 <= step < 5:  # sequence 1 steps alone, 0 and 2 together
            got = torch.cat([model.step_many(tokens[[0, 2]], [caches[0], caches[2]], room=room), model.step_many(tokens[1:2], [caches[1]], room=room)])[[0, 2, 1]]
        else:
            got = model.step_many(tokens, caches, room=room)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        tokens = want.argmax(-1)
    assert caches[0].batch is not None  # kept for the next step: its own slots lag behind
    caches[0].batch.unstack()
    for (_, a), b in zip(alone, caches):
        assert a.pos == b.pos and b.batch is None
        torch.testing.assert_close(a.k[:, :, :, : a.pos], b.k[:, :, :, : b.pos])
        torch.testing.assert_close(a.v[:, :, :, : a.pos], b.v[:, :, :, : b.pos])
        assert bool(b.key_mask[0, : b.pos].all())


def test_attention_to_is_the_attention_sdpa_used():
    """GPT.attention_to's weights, applied to the values by hand, give the attention output SDPA gave."""
    model = decisive(tiny(seed=3)).eval()
    idx = torch.randint(0, 37, (2, 9))
    query = torch.tensor([8, 5])
    w = model.attention_to(idx, query)
    assert w.shape == (2, 2, 4, 9)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 4))
    assert torch.all(w[1, :, :, 6:] == 0)  # causal: position 5 sees nothing after it
    # layer 0 by hand: the weights times the values equal the block's attention output
    attn = model.transformer.h[0].attn
    seen = {}
    hook = attn.c_proj.register_forward_hook(lambda m, inp, out: seen.setdefault("y", inp[0]))
    with torch.no_grad():
        model(idx)
    hook.remove()
    x = F.rms_norm(model.embed(idx), (32,))
    v = attn.c_v(x).view(2, 9, 2, 8).repeat_interleave(2, dim=2)  # GQA: 2 kv heads serve 4 query heads
    by_hand = torch.einsum("bht,bthd->bhd", w[:, 0], v)
    got = seen["y"].view(2, 9, 4, 8)[torch.arange(2), query]
    torch.testing.assert_close(by_hand, got, atol=1e-5, rtol=1e-4)
