"""Alignment statistics: how close audio tokens sit to the text they carry, in the LM's embedding space.

Design choices:
- The generic measures (cosine, retrieval, linear CKA, RMS, nearest tokens) accept torch tensors
  or numpy arrays and compute in float64 where sums of many products decide the answer.
- Every statistic has a control beside it, the same statistic with the pairing broken (a seeded
  derangement of clips, omni.common.derangement, or the words shuffled among tokens): a number
  means something only where it clears its control.
- A word's embedding is the mean of its tokens' embeddings, tokenized as in the transcript (a
  leading space for every word but the first), so the concatenated word tokens are the transcript's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from omni.common import derangement
from omni.eval.metrics import ArrayLike, as_numpy, check_same_length
from omni.model.tokenizer import ByteTokenizer

# ---------------------------------------------------------------------------------------------
# generic measures


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)  # a zero vector stays zero: cosine 0 with everything


def cosine(a: ArrayLike, b: ArrayLike) -> float:
    """Cosine similarity of two vectors (flattened); 0.0 if either is all zeros."""
    a, b = as_numpy(a).ravel(), as_numpy(b).ravel()
    check_same_length(a, b, "vectors differ in size")
    return float(_unit_rows(a) @ _unit_rows(b))


def rowwise_cosine(A: ArrayLike, B: ArrayLike) -> np.ndarray:
    """(N, d), (N, d) -> (N,) cosine of each row pair."""
    A, B = as_numpy(A), as_numpy(B)
    if A.shape != B.shape:
        raise ValueError(f"shapes differ: {A.shape} vs {B.shape}")
    return np.sum(_unit_rows(A) * _unit_rows(B), axis=-1)


def retrieval_at_k(queries: ArrayLike, keys: ArrayLike, k: int = 1) -> float:
    """Fraction of queries whose own key (key i for query i) is among the top k keys by cosine.

    Ties are scored by their expectation under random tie-breaking, so a collapsed embedding
    (all rows equal) scores chance, not 100%.
    """
    Q, K = _unit_rows(as_numpy(queries)), _unit_rows(as_numpy(keys))
    if Q.shape != K.shape or Q.ndim != 2:
        raise ValueError(f"queries and keys must both be (N, d), got {Q.shape} vs {K.shape}")
    if k < 1:
        raise ValueError("k must be >= 1")
    hits = 0.0
    for s in range(0, len(Q), 1024):  # row chunks bound the (chunk, N) similarity matrix
        sims = Q[s : s + 1024] @ K.T
        own = sims[np.arange(len(sims)), np.arange(s, s + len(sims))][:, None]
        tol = 1e-12
        greater = (sims > own + tol).sum(1)
        ties = (np.abs(sims - own) <= tol).sum(1) - 1  # minus the own key
        hits += np.clip((k - greater) / (ties + 1), 0.0, 1.0).sum()
    return float(hits / len(Q))


def retrieval_accuracy(queries: ArrayLike, keys: ArrayLike) -> float:
    """Top-1 retrieval: query i is right when key i is its most cosine-similar key."""
    return retrieval_at_k(queries, keys, k=1)


def retrieval_chance(n: int, k: int = 1) -> float:
    """Expected `retrieval_at_k` for random embeddings of n pairs."""
    return min(k, n) / n


def linear_cka(X: ArrayLike, Y: ArrayLike) -> float:
    """Linear CKA (Kornblith et al. 2019) between (N, d1) and (N, d2) representations of the same
    N items: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc.

    Invariant to orthogonal transforms and isotropic scaling; about sqrt(d1 d2)/N for independent
    data, so use N >> d. Float64 because the numerator sums N*d1*d2 products.
    """
    X, Y = as_numpy(X), as_numpy(Y)
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError("linear_cka needs 2-d (N, d) inputs")
    check_same_length(X, Y, "X and Y differ in number of rows")
    X, Y = X - X.mean(0), Y - Y.mean(0)
    # feature-space (d x d) products: cheaper than N x N Gram matrices when N > d
    xy = np.linalg.norm(Y.T @ X) ** 2
    xx, yy = np.linalg.norm(X.T @ X), np.linalg.norm(Y.T @ Y)
    if xx == 0 or yy == 0:
        return 0.0  # a constant representation shares no structure with anything
    return float(xy / (xx * yy))


def rms(x: ArrayLike) -> float:
    """Root mean square over all elements (the projector scales audio tokens to the text RMS)."""
    x = as_numpy(x)
    return float(np.sqrt(np.mean(x * x)))


def nearest_tokens(
    queries: ArrayLike, table: ArrayLike, k: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the k rows of `table` (e.g. the GPT's token embeddings) most
    cosine-similar to it: (indices (N, k) int64, sims (N, k) float32), most similar first."""
    q = torch.as_tensor(as_numpy(queries, np.float32))
    t = torch.as_tensor(as_numpy(table, np.float32))
    if q.ndim != 2 or t.ndim != 2 or q.shape[1] != t.shape[1]:
        shapes = f"{tuple(q.shape)}, {tuple(t.shape)}"
        raise ValueError(f"need (N, d) queries and (V, d) table with the same d, got {shapes}")
    if not 1 <= k <= t.shape[0]:
        raise ValueError(f"k must be in [1, {t.shape[0]}], got {k}")
    t = torch.nn.functional.normalize(t, dim=1)
    q = torch.nn.functional.normalize(q, dim=1)
    idx, sims = [], []
    for s in range(0, len(q), 1024):  # (chunk, V) at a time: V can be 50k
        top = (q[s : s + 1024] @ t.T).topk(k, dim=1)
        idx.append(top.indices)
        sims.append(top.values)
    if not idx:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return torch.cat(idx).numpy().astype(np.int64), torch.cat(sims).numpy()


# ---------------------------------------------------------------------------------------------
# clips, their words, and the statistics of their audio tokens


@dataclass
class Clip:
    row: int  # cache row
    text: str
    labels: dict
    words: list[str]  # whitespace words of the transcript
    spans: list[tuple[float, float]]  # seconds, one per word
    timing: str  # espeak | chars
    token_word: np.ndarray  # (A,) word index under each audio token, -1 = none
    text_ids: list[int] = field(default_factory=list)  # transcript tokens
    word_ids: list[list[int]] = field(default_factory=list)  # tokens of each word (transcript tokenization)


def word_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Tokens of each word as in the transcript " ".join(words): a leading space but for the first."""
    return [tokenizer.encode(w if i == 0 else " " + w) for i, w in enumerate(words)]


def token_table(gpt) -> np.ndarray:
    """(V, n_embd) float32: every token's embedding as the transformer sees it (GPT.embed)."""
    with torch.no_grad():
        ids = torch.arange(gpt.config.vocab_size, device=next(gpt.parameters()).device)[None]
        return gpt.embed(ids)[0].float().cpu().numpy()


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Readable token strings: a leading space shows as '·', BOS as <bos>, control bytes escaped."""
    out = []
    for i in range(vocab_size):
        if i == tokenizer.bos_id:
            out.append("<bos>")
            continue
        s = tokenizer.decode([i])
        if "\ufffd" in s:  # a byte (or BPE piece) that is not valid UTF-8 alone
            out.append(f"<0x{i:02x}>" if isinstance(tokenizer, ByteTokenizer) else f"<{i}>")
            continue
        s = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)
        out.append(s.replace(" ", "·") if s.strip() else repr(s)[1:-1].replace(" ", "·") or "''")
    return out


def readout(tokens: np.ndarray, table: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Nearest LM tokens (cosine) of each audio token: (ids (A, k), sims (A, k)), nearest first."""
    return nearest_tokens(tokens, table, k=min(k, len(table)))


def alignment_stats(tokens: list[np.ndarray], clips: list[Clip], table: np.ndarray, k: int = 5, candidates: int = 100, seed: int = 0) -> dict[str, float]:
    """How close audio tokens sit to the text they carry, in the LM's embedding space.

    tokens: per clip (A_i, D) audio tokens; clips: their transcripts and word timing; table: (V, D)
    token embeddings. Every "_control" value is the same statistic with the pairing broken (clip i
    against another clip's text, a seeded derangement, or the words shuffled among tokens): the level that means nothing.
    - cos_clip: cosine of a clip's mean audio token and the mean embedding of its transcript tokens
    - retrieval_a2t / _t2a: top-1 retrieval between those means among `candidates` clips (the sample
      cut into blocks of that size, a short last block dropped); retrieval_chance = 1 / candidates
    - rms_audio, rms_text (the whole table), rms_transcript (the clips' transcript tokens)
    - cka_word: linear CKA between audio tokens and the mean embedding of the word under each
    - nn_cos: cosine of each audio token to its nearest LM token (text_nn_cos: the same for the
      transcript tokens' nearest *other* token, the spacing of the table itself)
    - word_hit@k: an audio token's k nearest LM tokens include a token of its word
    - transcript_hit@k: ... include a token of its clip's transcript
    """
    n = len(clips)
    if n < 2 or len(tokens) != n:
        raise ValueError(f"need >= 2 clips with tokens, got {len(tokens)} token sets for {n} clips")
    g = np.random.default_rng(seed)
    a_mean = np.stack([t.mean(0) for t in tokens]).astype(np.float64)
    t_mean = np.stack([table[c.text_ids].mean(0) if c.text_ids else np.zeros(table.shape[1]) for c in clips]).astype(np.float64)
    other = np.array(derangement(n, seed))
    out = {
        "cos_clip": float(rowwise_cosine(a_mean, t_mean).mean()),
        "cos_clip_control": float(rowwise_cosine(a_mean, t_mean[other]).mean()),
    }
    N = min(candidates, n)
    blocks = [slice(s, s + N) for s in range(0, n - N + 1, N)]
    out["retrieval_a2t"] = float(np.mean([retrieval_accuracy(a_mean[b], t_mean[b]) for b in blocks]))
    out["retrieval_t2a"] = float(np.mean([retrieval_accuracy(t_mean[b], a_mean[b]) for b in blocks]))
    out["retrieval_chance"] = retrieval_chance(N)
    out["retrieval_candidates"] = float(N)

    A = np.concatenate(tokens)
    out["rms_audio"] = rms(A)
    out["rms_text"] = rms(table)
    all_text = [i for c in clips for i in c.text_ids]
    out["rms_transcript"] = rms(table[all_text]) if all_text else float("nan")

    # per audio token: its word's mean embedding, its word's token set, its clip
    word_emb = np.zeros_like(A, dtype=np.float64)
    has_word = np.zeros(len(A), dtype=bool)
    word_sets: list[set[int]] = []
    clip_of = np.concatenate([np.full(len(t), i) for i, t in enumerate(tokens)])
    s = 0
    for c, t in zip(clips, tokens):
        for j in range(len(t)):
            w = int(c.token_word[j]) if j < len(c.token_word) else -1
            ok = w >= 0 and len(c.word_ids[w]) > 0
            has_word[s + j] = ok
            word_sets.append(set(c.word_ids[w]) if ok else set())
            if ok:
                word_emb[s + j] = table[c.word_ids[w]].mean(0)
        s += len(t)
    out["tokens_with_word"] = float(has_word.mean())
    if has_word.sum() > 2:
        X, Y = A[has_word], word_emb[has_word]
        out["cka_word"] = linear_cka(X, Y)
        out["cka_word_control"] = linear_cka(X, Y[g.permutation(len(Y))])
    ids, sims = readout(A, table, k)
    out["nn_cos"] = float(sims[:, 0].mean())
    if all_text:
        _, tsims = nearest_tokens(table[sorted(set(all_text))], table, k=min(2, len(table)))
        out["text_nn_cos"] = float(tsims[:, -1].mean())
    if has_word.any():
        hit = np.array([bool(set(ids[i].tolist()) & word_sets[i]) for i in np.nonzero(has_word)[0]])
        perm = np.nonzero(has_word)[0][g.permutation(int(has_word.sum()))]
        ctl = np.array([bool(set(ids[i].tolist()) & word_sets[j]) for i, j in zip(np.nonzero(has_word)[0], perm)])
        out[f"word_hit@{k}"] = float(hit.mean())
        out[f"word_hit@{k}_control"] = float(ctl.mean())
    text_sets = [set(c.text_ids) for c in clips]
    out[f"transcript_hit@{k}"] = float(np.mean([bool(set(ids[i].tolist()) & text_sets[clip_of[i]]) for i in range(len(A))]))
    out[f"transcript_hit@{k}_control"] = float(np.mean([bool(set(ids[i].tolist()) & text_sets[other[clip_of[i]]]) for i in range(len(A))]))
    return out
