"""Metrics: what the experiments report, in one place so every system is scored the same way.

Design choices
- WER/CER are corpus-level: total edits / total reference words (chars). Averaging per-utterance
  rates over-weights short utterances, so per-utterance values are for inspection only.
- One text normalisation (`normalize_text`) for every system: NFKC, lower-case, punctuation and
  symbols become word breaks, intra-word apostrophes and intra-number "." / "," survive, numbers
  are not spelled out. Whisper's English normaliser (numbers, British spellings) is deliberately
  absent: a light rule is easy to audit, and what matters is that every system gets the same one.
- Edit distance is our own (Levenshtein, unit costs) so that empty references have one documented
  meaning; a test checks it against jiwer.
- Probes answer "is the texture label recoverable from these features": a linear probe on
  mean-pooled frames, and a learned-query attention probe for what mean pooling dilutes (a label
  carried by a few frames). Test labels never seen in training raise: for voice identity the test
  split must be held-out sentences of seen voices, and silently dropping classes would hide a
  wrong split.
- Alignment statistics (cosine, retrieval, linear CKA, RMS, nearest text tokens) accept torch
  tensors or numpy arrays and compute in float64 where sums of many products decide the answer.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # ships with scikit-learn

ArrayLike = Union[np.ndarray, torch.Tensor]


def _np(x: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.float32).numpy()
    return np.asarray(x, dtype=dtype)


def _check_same_length(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} vs {len(b)} items")


# ---------------------------------------------------------------------------------------------
# WER / CER

# NFKC leaves typographic apostrophes alone; fold them so "don’t" == "don't".
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'", "`": "'"})


def normalize_text(s: str) -> str:
    """NFKC, lower-case, punctuation/symbols -> space, collapse whitespace.

    Kept: apostrophes between two letters/digits ("don't"; a leading/trailing one as in
    "students'" is dropped), "." and "," between two digits ("3.5", "1,000": numbers are left as
    they are, not spelled out). Unicode categories P* and S* count as punctuation, so "well-known"
    becomes two words and "$5" becomes "5"; letters with diacritics are kept.
    """
    s = unicodedata.normalize("NFKC", s).lower().translate(_APOSTROPHES)
    out = []
    for i, c in enumerate(s):
        if unicodedata.category(c)[0] in "PS":
            prev = s[i - 1] if i > 0 else ""
            nxt = s[i + 1] if i + 1 < len(s) else ""
            keep = (c == "'" and prev.isalnum() and nxt.isalnum()) or (
                c in ".," and prev.isdigit() and nxt.isdigit()
            )
            out.append(c if keep else " ")
        else:
            out.append(c)
    return " ".join("".join(out).split())


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (unit substitution/insertion/deletion costs) between token sequences."""
    if len(ref) < len(hyp):  # distance is symmetric; loop over the shorter one (Python-level rows)
        ref, hyp = hyp, ref
    if len(hyp) == 0:
        return len(ref)
    vocab: dict = {}
    r = np.array([vocab.setdefault(t, len(vocab)) for t in ref])
    h = np.array([vocab.setdefault(t, len(vocab)) for t in hyp])
    m = len(h)
    ar = np.arange(m + 1)
    prev = ar.copy()
    cur = np.empty(m + 1, dtype=np.int64)
    for i, rt in enumerate(r, start=1):
        cur[0] = i
        np.minimum(prev[1:] + 1, prev[:-1] + (h != rt), out=cur[1:])
        # insertions chain along the row: cur[j] = min_k<=j cur[k] + (j - k), one vectorised scan
        prev = np.minimum.accumulate(cur - ar) + ar
    return int(prev[-1])


def _edits(refs: list[str], hyps: list[str], unit: str) -> tuple[list[int], list[int]]:
    _check_same_length(refs, hyps, "refs and hyps differ in length")
    split = str.split if unit == "word" else list
    edits, lengths = [], []
    for ref, hyp in zip(refs, hyps):
        r, h = split(normalize_text(ref)), split(normalize_text(hyp))
        edits.append(edit_distance(r, h))
        lengths.append(len(r))
    return edits, lengths


def _corpus_rate(edits: list[int], lengths: list[int]) -> float:
    if not edits:
        raise ValueError("no utterances to score")
    n_edits, n_ref = sum(edits), sum(lengths)
    if n_ref == 0:  # every reference empty: any output is infinitely wrong, none is perfect
        return 0.0 if n_edits == 0 else math.inf
    return n_edits / n_ref


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus word error rate after `normalize_text`.

    An empty (after normalisation) reference adds 0 to the denominator and its hypothesis' words
    to the numerator as insertions; only when all references are empty is the rate inf (or 0.0
    when all hypotheses are empty too).
    """
    return _corpus_rate(*_edits(refs, hyps, "word"))


def cer(refs: list[str], hyps: list[str]) -> float:
    """Corpus character error rate after `normalize_text`; the single spaces between words count
    as characters (as in jiwer). Empty references as in `wer`."""
    return _corpus_rate(*_edits(refs, hyps, "char"))


def per_utterance_wer(refs: list[str], hyps: list[str]) -> list[float]:
    """WER of each pair; an empty reference gives 0.0 for an empty hypothesis, else inf."""
    edits, lengths = _edits(refs, hyps, "word")
    return [e / n if n else (0.0 if e == 0 else math.inf) for e, n in zip(edits, lengths)]


# ---------------------------------------------------------------------------------------------
# Probes (texture)


@dataclass
class ProbeResult:
    accuracy: float  # on the test set
    chance: float  # majority-class rate on the TEST set: the best a constant guess could score
    n_train: int
    n_test: int
    n_classes: int  # classes seen in training
    chance_uniform: float  # 1 / n_classes; below `chance` whenever the test set is unbalanced


def _encode_labels(
    y_train: Sequence, y_test: Sequence
) -> tuple[np.ndarray, np.ndarray, list]:
    classes = sorted(set(y_train), key=str)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes in training, got {classes}")
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted({c for c in y_test if c not in index}, key=str)
    if unseen:
        raise ValueError(
            f"test labels never seen in training: {unseen[:10]} (a probe cannot predict them; for "
            "identity labels the test set must be held-out clips of seen speakers)"
        )
    return (
        np.array([index[c] for c in y_train]),
        np.array([index[c] for c in y_test]),
        classes,
    )


def _result(pred: np.ndarray, y_test: np.ndarray, n_train: int, n_classes: int) -> ProbeResult:
    majority = Counter(y_test.tolist()).most_common(1)[0][1] / len(y_test) if len(y_test) else 0.0
    return ProbeResult(
        accuracy=float(np.mean(pred == y_test)) if len(y_test) else float("nan"),
        chance=majority,
        n_train=n_train,
        n_test=len(y_test),
        n_classes=n_classes,
        chance_uniform=1.0 / n_classes,
    )


def mean_pool(features: Sequence[ArrayLike]) -> np.ndarray:
    """(T_i, d) frames per clip -> (N, d) float32 means."""
    out = []
    for f in features:
        f = _np(f, np.float32)
        if f.ndim != 2 or f.shape[0] == 0:
            raise ValueError(f"each clip must be a non-empty (T, d) array, got shape {f.shape}")
        out.append(f.mean(axis=0, dtype=np.float64))
    return np.stack(out).astype(np.float32)


def linear_probe(
    X_train: ArrayLike,
    y_train: Sequence,
    X_test: ArrayLike,
    y_test: Sequence,
    seed: int = 0,
    C: float = 1.0,
    threads: int | None = 1,
) -> ProbeResult:
    """Standardise, then multinomial logistic regression (lbfgs).

    C=1.0 on standardised features is a mild L2 penalty: enough to keep the fit finite when
    classes are separable (common with d ~ n), weak enough not to hide a real signal.
    BLAS runs on `threads` threads (None: no limit): on a busy 2-core box one thread fitted
    1600 x 384 x 10 classes in 0.13 s against 5.7 s with the default two.
    """
    return linear_probe_sets(X_train, y_train, [(X_test, y_test)], seed=seed, C=C, threads=threads)[0]


def linear_probe_sets(
    X_train: ArrayLike,
    y_train: Sequence,
    tests: Sequence[tuple[ArrayLike, Sequence]],
    seed: int = 0,
    C: float = 1.0,
    threads: int | None = 1,
) -> list[ProbeResult]:
    """`linear_probe` fitted once and scored on each (X_test, y_test) of `tests`."""
    X_train = _np(X_train)
    _check_same_length(X_train, y_train, "X_train and y_train differ in length")
    encoded = []
    for X_test, y_test in tests:
        X_test = _np(X_test)
        _check_same_length(X_test, y_test, "X_test and y_test differ in length")
        ytr, yte, classes = _encode_labels(y_train, y_test)
        encoded.append((X_test, yte))
    if not encoded:
        raise ValueError("need at least one test set")
    scaler = StandardScaler().fit(X_train)
    # lbfgs on >2 classes is multinomial (softmax) in sklearn >= 1.5; no `multi_class` needed.
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=2000, random_state=seed)
    with threadpool_limits(limits=threads):
        clf.fit(scaler.transform(X_train), ytr)
        out = []
        for X_test, yte in encoded:
            pred = clf.predict(scaler.transform(X_test)) if len(X_test) else np.array([], dtype=int)
            out.append(_result(pred, yte, len(ytr), len(classes)))
    return out


def _pad(features: Sequence[ArrayLike]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_i, d) clips -> zero-padded (N, T_max, d) float32, (N, T_max) bool mask of real frames."""
    feats = [f if isinstance(f, torch.Tensor) else torch.as_tensor(np.asarray(f)) for f in features]
    if any(f.ndim != 2 or f.shape[0] == 0 for f in feats):
        raise ValueError("each clip must be a non-empty (T, d) array")
    t_max, d = max(f.shape[0] for f in feats), feats[0].shape[1]
    x = torch.zeros(len(feats), t_max, d)
    mask = torch.zeros(len(feats), t_max, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f.detach().to(torch.float32)
        mask[i, : f.shape[0]] = True
    return x, mask


def _frame_stats(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over real frames (padded frames are zero and masked out).

    Two passes, summing within a clip in float32 and across clips in float64: no copy of x, and
    centring before squaring avoids cancellation on Whisper's large-mean dimensions."""
    n = mask.sum().item()
    mean = (x.sum(1).double().sum(0) / n).float()
    s2 = torch.zeros(x.shape[-1], dtype=torch.float64)
    for i in range(0, len(x), 128):
        c = (x[i : i + 128] - mean) * mask[i : i + 128].unsqueeze(-1)
        s2 += (c * c).sum(1).double().sum(0)
    return mean, (s2 / max(n - 1, 1)).sqrt().clamp_min(1e-6).float()


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class AttentionPool(torch.nn.Module):
    """One learned query scores every frame; the softmax-weighted frame average feeds a linear
    classifier. The query starts at zero, so training starts from the mean-pooling probe and
    moves away from it only where attending to some frames helps."""

    def __init__(self, d: int, n_classes: int):
        super().__init__()
        self.query = torch.nn.Parameter(torch.zeros(d))
        self.classifier = torch.nn.Linear(d, n_classes)
        self.scale = d**-0.5  # keeps score steps ~ lr whatever d is (Adam steps every coordinate)

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = (x @ self.query) * self.scale
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=1)
        return torch.einsum("nt,ntd->nd", weights, x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x, mask))


def attention_probe(
    train_feats: Sequence[ArrayLike],
    y_train: Sequence,
    test_feats: Sequence[ArrayLike],
    y_test: Sequence,
    seed: int = 0,
    steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 0.1,
    threads: int | None = 1,
) -> ProbeResult:
    """Learned-query attention pooling over frames + linear classifier, Adam on minibatches.

    Frames are standardised per dimension with train statistics (Whisper states have a few
    huge-magnitude dimensions that would otherwise own the attention scores). Clips may differ
    in length; padding is masked. Neither this nor `mean_pool` sees the clip length itself.
    Deterministic given `seed` (own generator for init and batch order).

    `steps` doubles as early stopping: with 1600 clips x 384 dims and a weak class signal in
    every frame, test accuracy fell from 0.32 at 100 steps to 0.21 at 500 (overfitting), while a
    one-frame signal rose from 0.86 to 0.93; 200 steps with AdamW decay 0.1 sat near the best of
    both (0.27 vs the linear probe's 0.27; 0.91 vs 0.18). Report both probes side by side.

    Runs on `threads` torch threads (None: leave torch's setting), restored on return. One by
    default: the ops are small, and on a busy shared CPU intra-op thread synchronisation cost us
    ~200x (0.14 s vs 27 s for the one-frame test task, 2 cores, load 4).
    """
    return attention_probe_sets(train_feats, y_train, [(test_feats, y_test)], seed=seed, steps=steps, lr=lr,
                                batch_size=batch_size, weight_decay=weight_decay, threads=threads)[0]


def attention_probe_sets(
    train_feats: Sequence[ArrayLike],
    y_train: Sequence,
    tests: Sequence[tuple[Sequence[ArrayLike], Sequence]],
    seed: int = 0,
    steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 0.1,
    threads: int | None = 1,
) -> list[ProbeResult]:
    """`attention_probe` fitted once and scored on each (test_feats, y_test) of `tests`."""
    _check_same_length(train_feats, y_train, "train_feats and y_train differ in length")
    if not tests:
        raise ValueError("need at least one test set")
    encoded = []
    for test_feats, y_test in tests:
        _check_same_length(test_feats, y_test, "test_feats and y_test differ in length")
        ytr, yte, classes = _encode_labels(y_train, y_test)
        encoded.append((test_feats, yte))
    with _torch_threads(threads):
        gen = torch.Generator().manual_seed(seed)
        # Pad the clips in a random order once, so minibatches are contiguous slices (views):
        # gathering random rows of a (N, T, d) tensor every step costs more than the step.
        perm = torch.randperm(len(ytr), generator=gen)
        x, mask = _pad([train_feats[i] for i in perm.tolist()])
        y = torch.from_numpy(ytr)[perm]
        mu, sd = _frame_stats(x, mask)
        x.sub_(mu).div_(sd).mul_(mask.unsqueeze(-1))  # in place: x can be hundreds of MB

        model = AttentionPool(x.shape[-1], len(classes))
        with torch.no_grad():  # seeded init independent of the global RNG
            bound = x.shape[-1] ** -0.5
            w = model.classifier.weight
            w.copy_(torch.rand(w.shape, generator=gen) * 2 * bound - bound)
            model.classifier.bias.zero_()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        starts = list(range(0, len(y), batch_size))
        order: list[int] = []
        for _ in range(steps):
            if not order:  # a new epoch: same batches, new order
                order = torch.randperm(len(starts), generator=gen).tolist()
            s = starts[order.pop()]
            b = slice(s, s + batch_size)
            loss = torch.nn.functional.cross_entropy(model(x[b], mask[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        del x

        model.eval()
        out = []
        with torch.no_grad():
            for test_feats, yte in encoded:
                pred = []
                for i in range(0, len(test_feats), 512):  # chunks: padding all at once doubles memory
                    xt, mt = _pad(test_feats[i : i + 512])
                    xt = (xt - mu) / sd * mt.unsqueeze(-1)
                    pred.append(model(xt, mt).argmax(-1))
                pred_np = torch.cat(pred).numpy() if pred else np.array([], dtype=int)
                out.append(_result(pred_np, yte, len(ytr), len(classes)))
    return out


# ---------------------------------------------------------------------------------------------
# Alignment statistics


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)  # a zero vector stays zero: cosine 0 with everything


def cosine(a: ArrayLike, b: ArrayLike) -> float:
    """Cosine similarity of two vectors (flattened); 0.0 if either is all zeros."""
    a, b = _np(a).ravel(), _np(b).ravel()
    _check_same_length(a, b, "vectors differ in size")
    return float(_unit_rows(a) @ _unit_rows(b))


def rowwise_cosine(A: ArrayLike, B: ArrayLike) -> np.ndarray:
    """(N, d), (N, d) -> (N,) cosine of each row pair."""
    A, B = _np(A), _np(B)
    if A.shape != B.shape:
        raise ValueError(f"shapes differ: {A.shape} vs {B.shape}")
    return np.sum(_unit_rows(A) * _unit_rows(B), axis=-1)


def retrieval_at_k(queries: ArrayLike, keys: ArrayLike, k: int = 1) -> float:
    """Fraction of queries whose own key (key i for query i) is among the top k keys by cosine.

    Ties are scored by their expectation under random tie-breaking, so a collapsed embedding
    (all rows equal) scores chance, not 100%.
    """
    Q, K = _unit_rows(_np(queries)), _unit_rows(_np(keys))
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
    X, Y = _np(X), _np(Y)
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError("linear_cka needs 2-d (N, d) inputs")
    _check_same_length(X, Y, "X and Y differ in number of rows")
    X, Y = X - X.mean(0), Y - Y.mean(0)
    # feature-space (d x d) products: cheaper than N x N Gram matrices when N > d
    xy = np.linalg.norm(Y.T @ X) ** 2
    xx, yy = np.linalg.norm(X.T @ X), np.linalg.norm(Y.T @ Y)
    if xx == 0 or yy == 0:
        return 0.0  # a constant representation shares no structure with anything
    return float(xy / (xx * yy))


def rms(x: ArrayLike) -> float:
    """Root mean square over all elements (the projector scales audio tokens to the text RMS)."""
    x = _np(x)
    return float(np.sqrt(np.mean(x * x)))


def nearest_tokens(
    queries: ArrayLike, table: ArrayLike, k: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the k rows of `table` (e.g. the GPT's token embeddings) most
    cosine-similar to it: (indices (N, k) int64, sims (N, k) float32), most similar first."""
    q = torch.as_tensor(_np(queries, np.float32))
    t = torch.as_tensor(_np(table, np.float32))
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
