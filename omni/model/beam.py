"""Joint CTC/LM beam search: an LM's transcript kept tied to the audio.

Each hypothesis y is scored as

    score(y) = ctc_weight * log p_ctc(y | audio) + (1 - ctc_weight) * log p_lm(y, EOS | audio tokens)

and grown one token at a time (Watanabe et al. 2017, "Hybrid CTC/attention"; ESPnet's CTC prefix
scorer). The CTC term of a partial hypothesis is its prefix probability: the probability that the
audio's CTC posteriors spell y followed by anything, summed over every alignment. It never grows as y
grows, so a decoder that runs off into its own prose is pulled back at the first token the audio does
not support, and the end of the transcript is decided by both: the EOS extension scores the CTC
probability of the whole of y (all frames consumed) beside the LM's EOS.

Design choices:
- Vectorised over clips and beams: the LM's KV cache holds clips x beams rows and is re-indexed to
  the surviving parents each step (`cache.select`); the CTC forward variables of every hypothesis
  (frames x {ends in a token, ends in blank}) are extended for all its candidate tokens at once.
- Candidates: per clip, the `candidates` tokens with the highest posterior at their best frame
  (blank and EOS aside). A token the posteriors never favour has a negligible prefix probability;
  this is ESPnet's pre-beam in another form, chosen from the audio rather than from the LM, so the LM
  cannot propose what was not said. `candidates=0` scores the whole vocabulary (exact; the tests).
- Every live hypothesis's EOS extension is scored at every step and the best complete one per clip
  kept; a clip stops once that score beats every live hypothesis (scores only fall as hypotheses
  grow: no length normalisation), so the search is exact when the beam holds every hypothesis.
- Frames past a clip's length emit blank with probability 1, so a batch of clips of different
  lengths gives each clip the result it gets alone.
- ctc_weight 0 is a plain LM beam search (no CTC needed), 1 a CTC prefix beam search whose EOS is
  the CTC's (the LM only orders ties).

Why our own (about 150 lines): torchaudio's CTC decoder cannot be installed on the CPU here
(torchaudio breaks transformers' Whisper import without CUDA), and pyctcdecode and
torchaudio's decoders take n-gram LMs, not a neural LM that reads the audio itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NEG = float("-inf")


@dataclass
class BeamResult:
    tokens: list[list[int]]  # the best complete hypothesis per clip, EOS left out
    score: list[float]  # its joint score
    ctc_logprob: list[float]  # log p_ctc(y | audio) of it (nan when ctc_weight is 0)
    lm_logprob: list[float]  # log p_lm(y, EOS | audio tokens) of it


def pad_frames(logp: Tensor, lengths: Tensor, blank: int) -> Tensor:
    """(B, T, V) CTC log-posteriors with every frame past a clip's length made a certain blank."""
    past = torch.arange(logp.size(1), device=logp.device)[None, :] >= lengths[:, None]
    certain = torch.full_like(logp[0, 0], NEG)
    certain[blank] = 0.0
    return torch.where(past[..., None], certain, logp)


def empty_prefix(logp: Tensor, blank: int) -> Tensor:
    """Forward variables of the empty hypothesis, (T, 2, B): [:, 0] ends in a token (impossible),
    [:, 1] ends in blank (every frame so far blank)."""
    r = torch.full((logp.size(1), 2, logp.size(0)), NEG, dtype=logp.dtype, device=logp.device)
    r[:, 1] = logp[:, :, blank].cumsum(1).T
    return r


def extend(r: Tensor, last: Tensor, empty: Tensor, cands: Tensor, x: Tensor, x_blank: Tensor) -> tuple[Tensor, Tensor]:
    """Every hypothesis h (N of them: forward variables r (T, 2, N), last token `last` (N,), `empty`
    (N,) True for the empty one) extended by each of its candidates `cands` (N, C), whose posteriors
    are x (T, N, C) = log p_t(c); x_blank (T, N) = log p_t(blank). Returns the forward variables of
    h + c (T, 2, N, C) and its prefix log-probability (N, C): log sum_t p(h by frame t - 1, c at t)."""
    T, N, C = x.shape
    rn, rb = r[:, 0, :, None], r[:, 1, :, None]
    # phi_t: h complete by frame t in a way c can follow; a repeated token needs a blank between
    phi = torch.where((cands == last[:, None])[None], rb, torch.logaddexp(rn, rb))  # (T, N, C)
    out = torch.full((T, 2, N, C), NEG, dtype=x.dtype, device=x.device)
    out[0, 0] = torch.where(empty[:, None], x[0], NEG)  # c at the very first frame: only after nothing
    for t in range(1, T):
        out[t, 0] = torch.logaddexp(out[t - 1, 0], phi[t - 1]) + x[t]
        out[t, 1] = torch.logaddexp(out[t - 1, 1], out[t - 1, 0]) + x_blank[t, :, None]
    prefix = torch.logsumexp(torch.cat([out[:1, 0], phi[:-1] + x[1:]]), dim=0)
    return out, prefix


def full(r: Tensor) -> Tensor:
    """log p_ctc(h | audio) from h's forward variables (T, 2, ...): h complete at the last frame."""
    return torch.logaddexp(r[-1, 0], r[-1, 1])


def candidates_of(logp: Tensor, n: int, exclude: list[int]) -> Tensor:
    """(B, C) token ids per clip: the n with the highest posterior at their best frame (all tokens
    but `exclude` when n is 0 or covers them)."""
    best = logp.amax(dim=1)  # (B, V)
    best[:, exclude] = NEG
    V = best.size(1) - len(set(exclude))
    return best.topk(V if n <= 0 else min(n, V), dim=1).indices


@torch.no_grad()
def joint_beam_search(lm, idx: Tensor, audio: Tensor | None, audio_mask: Tensor | None, ctc_logp: Tensor | None,
                      ctc_lengths: Tensor | None, *, blank: int, eos: int, beam: int = 8, ctc_weight: float = 0.3,
                      max_new_tokens: int = 200, candidates: int = 128, audio_idx: Tensor | None = None) -> BeamResult:
    """The best transcript per clip under the joint score (module docstring).

    lm: any backbone of omni.model.lm with prefill/step; idx (B, L) the text the transcript follows
    (e.g. [prompt][BOS]); audio, audio_mask: the LM's soft prefix; ctc_logp (B, T, V) log-posteriors
    over the LM vocabulary with `blank`, ctc_lengths (B,) frames per clip (both None when ctc_weight
    is 0)."""
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(f"ctc_decode_weight={ctc_weight} must be in [0, 1] (parameter `ctc_decode_weight`)")
    if beam < 1:
        raise ValueError(f"beam={beam} must be >= 1 (parameter `beam`)")
    use_ctc = ctc_weight > 0
    if use_ctc and (ctc_logp is None or ctc_lengths is None):
        raise ValueError("ctc_decode_weight > 0 needs CTC posteriors: a run trained with a CTC head (ctc_weight > 0)")
    B, W, dev = idx.size(0), beam, idx.device
    N = B * W
    clip = torch.arange(B, device=dev).repeat_interleave(W)  # the clip of every hypothesis
    logits, cache = lm.prefill(idx, audio, audio_mask, max_new_tokens, audio_idx)
    cache.select(clip)
    lm_logp = logits.float().log_softmax(-1)[clip]
    V = lm_logp.size(1)
    if use_ctc:
        logp = pad_frames(ctc_logp.float(), ctc_lengths, blank)
        cands = candidates_of(logp, candidates, [blank, eos])[clip]  # (N, C)
        r = empty_prefix(logp, blank)[:, :, clip]  # (T, 2, N)
        x_blank = logp[:, :, blank].T[:, clip]  # (T, N)
        limit = ctc_lengths.max().item()  # CTC cannot spell more tokens than it has frames
    else:
        cands = torch.tensor([v for v in range(V) if v not in (blank, eos)], device=dev).expand(N, -1)
        limit = max_new_tokens
    C = cands.size(1)
    score = torch.full((B, W), NEG, device=dev)
    score[:, 0] = 0.0  # one live hypothesis (the empty one) per clip to start with
    score = score.flatten()
    psi = torch.zeros(N, device=dev)  # prefix log-probability of each hypothesis (1 for the empty one)
    ctc_sum, lm_sum = torch.zeros(N, device=dev), torch.zeros(N, device=dev)
    last = torch.full((N,), -1, dtype=torch.long, device=dev)
    hist = torch.empty(N, 0, dtype=torch.long, device=dev)
    best = torch.full((B,), NEG, device=dev)
    best_tokens: list[list[int]] = [[] for _ in range(B)]
    best_ctc, best_lm = [float("nan")] * B, [float("nan")] * B
    for step in range(min(max_new_tokens, int(limit)) + 1):
        live = score > NEG
        # every live hypothesis ended here: the CTC probability of all of it, the LM's EOS
        eos_lm = lm_logp[:, eos]
        eos_ctc = full(r) - psi if use_ctc else torch.zeros_like(psi)
        ended = torch.where(live, score + (1 - ctc_weight) * eos_lm + ctc_weight * eos_ctc, NEG).view(B, W)
        top, at = ended.max(dim=1)
        for b in torch.nonzero(top > best).flatten().tolist():
            n = b * W + int(at[b])
            best[b] = top[b]
            best_tokens[b] = hist[n].tolist()
            best_lm[b] = float(lm_sum[n] + eos_lm[n])
            best_ctc[b] = float(ctc_sum[n] + eos_ctc[n]) if use_ctc else float("nan")
        # a clip is done when its best complete transcript beats every live hypothesis (scores only fall)
        running = score.view(B, W).max(dim=1).values
        if bool((best >= running).all()) or step == min(max_new_tokens, int(limit)):
            break
        ext_lm = lm_logp.gather(1, cands)  # (N, C)
        if use_ctc:
            x = logp[clip[:, None, None], torch.arange(logp.size(1), device=dev)[None, :, None], cands[:, None, :]].permute(1, 0, 2)
            r_new, psi_new = extend(r, last, last < 0, cands, x, x_blank)  # last -1: the empty hypothesis
            ext_ctc = psi_new - psi[:, None]
        else:
            ext_ctc = torch.zeros_like(ext_lm)
        ext = score[:, None] + (1 - ctc_weight) * ext_lm + ctc_weight * ext_ctc
        ext = torch.where(live[:, None], ext, NEG).nan_to_num(nan=NEG)
        top, flat = ext.view(B, W * C).topk(W, dim=1)  # the next beam of each clip
        parent = (torch.arange(B, device=dev)[:, None] * W + flat // C).flatten()
        col = (flat % C).flatten()
        token = cands[parent, col]
        score = top.flatten()
        ctc_sum = ctc_sum[parent] + ext_ctc[parent, col]
        lm_sum = lm_sum[parent] + ext_lm[parent, col]
        if use_ctc:
            r, psi = r_new[:, :, parent, col], psi_new[parent, col]
        last = token
        hist = torch.cat([hist[parent], token[:, None]], dim=1)
        cache.select(parent)
        lm_logp = lm.step(token, cache).float().log_softmax(-1)
    return BeamResult(best_tokens, best.tolist(), best_ctc, best_lm)
