"""Joint CTC/LM beam search (omni.model.beam) against brute-force enumeration on a tiny vocabulary."""

import itertools
import math

import pytest
import torch

from omni.model.beam import empty_prefix, extend, full, joint_beam_search, pad_frames
from omni.model.gpt import GPT, GPTConfig

BLANK = 0  # also the LM's BOS / EOS, as in omni's tokenizers
V = 4  # blank + three tokens


def ctc_brute(logp: torch.Tensor, y: list[int]) -> float:
    """log p_ctc(y) by summing over every frame labelling that collapses to y."""
    T = logp.size(0)
    total = []
    for path in itertools.product(range(V), repeat=T):
        out = [c for i, c in enumerate(path) if c != BLANK and (i == 0 or c != path[i - 1])]
        if out == list(y):
            total.append(sum(float(logp[t, c]) for t, c in enumerate(path)))
    return float(torch.logsumexp(torch.tensor(total), 0)) if total else -math.inf


def prefix_brute(logp: torch.Tensor, y: list[int]) -> float:
    """log p(y is a prefix of the labelling): the sum over labellings whose collapse starts with y."""
    T = logp.size(0)
    total = []
    for path in itertools.product(range(V), repeat=T):
        out = [c for i, c in enumerate(path) if c != BLANK and (i == 0 or c != path[i - 1])]
        if out[: len(y)] == list(y):
            total.append(sum(float(logp[t, c]) for t, c in enumerate(path)))
    return float(torch.logsumexp(torch.tensor(total), 0)) if total else -math.inf


def posteriors(T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, V, generator=g) * 2).log_softmax(-1)


def forward_vars(logp: torch.Tensor, y: list[int]) -> torch.Tensor:
    """Forward variables of y (T, 2, 1), grown token by token with `extend`."""
    lp = logp[None]
    r = empty_prefix(lp, BLANK)
    last = torch.tensor([-1])
    for c in y:
        cands = torch.tensor([[c]])
        x = lp[0, :, c][:, None, None]
        r, _ = extend(r, last, last < 0, cands, x, lp[0, :, BLANK][:, None])
        r = r[:, :, :, 0]
        last = torch.tensor([c])
    return r


@pytest.mark.parametrize("y", [[], [1], [2, 2], [1, 3], [3, 1, 3], [1, 1, 1]])
def test_ctc_prefix_and_full_probability_match_brute_force(y):
    logp = posteriors(5, seed=len(y))
    r = forward_vars(logp, y)
    assert float(full(r)[0]) == pytest.approx(ctc_brute(logp, y), abs=1e-4)
    if y:  # the prefix probability of y, from its parent's variables
        parent = forward_vars(logp, y[:-1])
        last = torch.tensor([y[-2] if len(y) > 1 else -1])
        _, psi = extend(parent, last, last < 0, torch.tensor([[y[-1]]]), logp[:, y[-1]][:, None, None], logp[:, BLANK][:, None])
        assert float(psi[0, 0]) == pytest.approx(prefix_brute(logp, y), abs=1e-4)


def test_padding_frames_change_nothing():
    logp = posteriors(4, seed=3)
    padded = pad_frames(torch.cat([logp, posteriors(3, seed=9)])[None], torch.tensor([4]), BLANK)[0]
    for y in ([1], [2, 3], [3, 3]):
        assert float(full(forward_vars(padded, y))[0]) == pytest.approx(ctc_brute(logp, y), abs=1e-5)


def tiny_lm(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    lm = GPT(GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=8))
    torch.nn.init.normal_(lm.lm_head.weight, std=1.0)  # an opinionated LM, not a uniform one
    return lm.eval()


def lm_logprob(lm: GPT, idx: torch.Tensor, audio: torch.Tensor, y: list[int]) -> float:
    seq = torch.cat([idx, torch.tensor([y], dtype=torch.long).view(1, -1)], dim=1)
    with torch.no_grad():
        logp = lm(seq, audio=audio).log_softmax(-1)[0]
    targets = y + [BLANK]  # EOS = BOS = blank
    return float(sum(logp[idx.size(1) - 1 + i, t] for i, t in enumerate(targets)))


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.7, 1.0])
def test_beam_search_finds_the_brute_force_best(weight):
    T = 4
    lm = tiny_lm()
    audio = torch.randn(1, 3, 8)
    idx = torch.tensor([[BLANK]])
    logp = posteriors(T, seed=11)
    best, best_y = -math.inf, None
    for n in range(T + 1):
        for y in itertools.product(range(1, V), repeat=n):
            ctc = ctc_brute(logp, list(y)) if weight > 0 else 0.0
            s = weight * ctc + (1 - weight) * lm_logprob(lm, idx, audio, list(y))
            if s > best:
                best, best_y = s, list(y)
    res = joint_beam_search(lm, idx, audio, None, logp[None], torch.tensor([T]), blank=BLANK, eos=BLANK, beam=27,
                            ctc_weight=weight, max_new_tokens=T, candidates=0)
    assert res.tokens[0] == best_y
    assert res.score[0] == pytest.approx(best, abs=1e-4)
    assert res.lm_logprob[0] == pytest.approx(lm_logprob(lm, idx, audio, best_y), abs=1e-4)
    if weight > 0:
        assert res.ctc_logprob[0] == pytest.approx(ctc_brute(logp, best_y), abs=1e-4)


def test_a_confident_ctc_overrules_the_lm_and_decides_the_end():
    """Posteriors that spell [2, 1] clearly: the joint search writes exactly that, whatever the LM prefers."""
    lm = tiny_lm(seed=1)
    T = 6
    logp = torch.full((T, V), -8.0)
    for t, c in enumerate([2, 2, BLANK, 1, BLANK, BLANK]):
        logp[t, c] = 0.0
    logp = logp.log_softmax(-1)
    res = joint_beam_search(lm, torch.tensor([[BLANK]]), torch.randn(1, 2, 8), None, logp[None], torch.tensor([T]),
                            blank=BLANK, eos=BLANK, beam=4, ctc_weight=0.5, max_new_tokens=10)
    assert res.tokens[0] == [2, 1]


def test_a_batch_gives_each_clip_what_it_gets_alone():
    lm = tiny_lm(seed=2)
    lengths = torch.tensor([5, 3, 4])
    logps = [posteriors(int(n), seed=20 + i) for i, n in enumerate(lengths)]
    batch = torch.stack([torch.cat([lp, posteriors(5 - lp.size(0), seed=99)]) if lp.size(0) < 5 else lp for lp in logps])
    audio = torch.randn(3, 2, 8)
    idx = torch.full((3, 1), BLANK)
    together = joint_beam_search(lm, idx, audio, None, batch, lengths, blank=BLANK, eos=BLANK, beam=3, ctc_weight=0.4, max_new_tokens=6)
    for i in range(3):
        alone = joint_beam_search(lm, idx[i : i + 1], audio[i : i + 1], None, logps[i][None], lengths[i : i + 1],
                                  blank=BLANK, eos=BLANK, beam=3, ctc_weight=0.4, max_new_tokens=6)
        assert together.tokens[i] == alone.tokens[0]
        assert together.score[i] == pytest.approx(alone.score[0], abs=1e-4)


def test_bad_settings_are_refused_naming_the_parameter():
    lm = tiny_lm()
    idx = torch.tensor([[BLANK]])
    with pytest.raises(ValueError, match="ctc_decode_weight"):
        joint_beam_search(lm, idx, None, None, None, None, blank=BLANK, eos=BLANK, ctc_weight=1.5)
    with pytest.raises(ValueError, match="beam"):
        joint_beam_search(lm, idx, None, None, None, None, blank=BLANK, eos=BLANK, beam=0, ctc_weight=0.0)
    with pytest.raises(ValueError, match="CTC"):
        joint_beam_search(lm, idx, None, None, None, None, blank=BLANK, eos=BLANK, ctc_weight=0.3)
