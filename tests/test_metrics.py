import math

import jiwer
import numpy as np
import pytest
import torch

from omni.eval.embedding_stats import (
    cosine,
    linear_cka,
    nearest_tokens,
    retrieval_accuracy,
    retrieval_at_k,
    retrieval_chance,
    rms,
    rowwise_cosine,
)
from omni.eval.metrics import cer, normalize_text, per_utterance_wer, wer
from omni.eval.probes import AttentionPool, _pad, attention_probe, linear_probe, mean_pool

# --------------------------------------------------------------------------------- WER / CER


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Hello, World!", "hello world"),
        ("  Don\u2019t   STOP ", "don't stop"),  # typographic apostrophe folded, kept inside a word
        ("'quoted' students'", "quoted students"),  # edge apostrophes are quotes, not letters
        ("well-known (sic.)", "well known sic"),
        ("pi is 3.14, about 1,000 mm", "pi is 3.14 about 1,000 mm"),  # numbers left as they are
        ("\ufb01ne \uff21\uff22", "fine ab"),  # NFKC: ligature and full-width letters
        ("Caf\u00e9 $5", "caf\u00e9 5"),
        ("...", ""),
    ],
)
def test_normalize_text(raw: str, norm: str) -> None:
    assert normalize_text(raw) == norm


def test_wer_hand_computed() -> None:
    assert wer(["the cat sat down"], ["the cat sat up"]) == 0.25  # 1 substitution / 4 words
    assert wer(["Hello, World!"], ["hello world"]) == 0.0
    assert wer(["a b c"], ["a b c d e"]) == pytest.approx(2 / 3)  # 2 insertions
    assert wer(["a b c"], [""]) == 1.0  # 3 deletions
    assert wer(["a b c d"], ["b c d a"]) == 0.5  # delete a, insert a


def test_wer_is_corpus_level_not_mean_of_utterances() -> None:
    refs, hyps = ["a b c d", "e f"], ["a x c d", "e f"]
    assert per_utterance_wer(refs, hyps) == [0.25, 0.0]
    assert wer(refs, hyps) == pytest.approx(1 / 6)  # the mean of utterances would be 0.125


def test_cer_hand_computed() -> None:
    assert cer(["abcd"], ["abxd"]) == 0.25
    assert cer(["hello world"], ["helo world"]) == pytest.approx(1 / 11)  # the space counts
    assert cer(["Hello, World!"], ["hello world"]) == 0.0


def test_empty_references() -> None:
    assert wer(["", "a b"], ["x", "a b"]) == 0.5  # the insertion counts, the empty ref adds 0 words
    assert per_utterance_wer(["", "", "a"], ["", "x", "a"]) == [0.0, math.inf, 0.0]
    assert wer([""], [""]) == 0.0
    assert wer(["?!"], ["x"]) == math.inf  # empty after normalisation, every ref empty


def test_mixed_empty_and_non_empty_references_hand_computed() -> None:
    refs, hyps = ["a b c", "a b", "", "x"], ["a x c d", "", "y z", "x"]
    # 1 substitution + 1 insertion of 3 words; 2 deletions of 2; 2 insertions into an empty ref; exact
    assert per_utterance_wer(refs, hyps) == [pytest.approx(2 / 3), 1.0, math.inf, 0.0]
    assert wer(refs, hyps) == pytest.approx(6 / 6)  # (2 + 2 + 2 + 0) edits / (3 + 2 + 0 + 1) words
    assert cer(["", "ab"], ["xy", "ab"]) == 1.0  # 2 inserted chars / 2 reference chars
    assert cer(["ab cd"], ["abcd"]) == pytest.approx(1 / 5)  # the deleted space is one of 5 chars


def test_wer_matches_jiwer_on_random_pairs() -> None:
    rng = np.random.default_rng(0)
    vocab = list("abcde")
    refs = [" ".join(rng.choice(vocab, rng.integers(1, 15))) for _ in range(200)]
    hyps = [" ".join(rng.choice(vocab, rng.integers(0, 15))) for _ in range(200)]
    assert wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    assert cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))


@pytest.mark.parametrize("fn", [wer, cer, per_utterance_wer])
def test_text_metrics_reject_bad_input(fn) -> None:
    with pytest.raises(ValueError):
        fn(["a b", "c"], ["a b"])
    if fn is not per_utterance_wer:
        with pytest.raises(ValueError):
            fn([], [])


# --------------------------------------------------------------------------------- probes


def _clusters(n: int, d: int, k: int, sep: float, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * sep
    y = rng.integers(0, k, n)
    return centres[y] + rng.standard_normal((n, d)), [f"class{c}" for c in y]


@pytest.mark.parametrize("d, k", [(1, 3), (64, 10)])
def test_linear_probe_separable_clusters(d: int, k: int) -> None:
    if d == 1:  # 1-d: put the classes far apart on the line
        rng = np.random.default_rng(1)
        y = rng.integers(0, k, 600)
        X, labels = (y * 20.0 + rng.standard_normal(600))[:, None], [str(c) for c in y]
    else:
        X, labels = _clusters(600, d, k, sep=5.0, seed=1)
    r = linear_probe(X[:400], labels[:400], X[400:], labels[400:])
    assert r.accuracy >= 0.99
    assert (r.n_train, r.n_test, r.n_classes) == (400, 200, k)
    assert r.chance_uniform == pytest.approx(1 / k)
    assert r.chance < 0.6


def test_linear_probe_random_labels_is_near_chance() -> None:
    rng = np.random.default_rng(2)
    X = rng.standard_normal((1000, 20))
    y = [str(c) for c in rng.integers(0, 3, 1000)]
    r = linear_probe(X[:600], y[:600], X[600:], y[600:])
    # chance ~0.36 (majority of 400 test labels); binomial std ~0.024, so 0.45 is > 3 sigma
    assert abs(r.accuracy - r.chance) < 0.09
    assert r.accuracy < 0.45


def test_probe_chance_is_test_majority_rate() -> None:
    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    X_test = np.array([[0.5], [0.2], [0.1], [10.5]])
    r = linear_probe(X, ["a", "a", "b", "b"], X_test, ["a", "a", "a", "b"])
    assert r.chance == 0.75 and r.chance_uniform == 0.5 and r.accuracy == 1.0


def test_probes_reject_unseen_test_labels_and_single_class() -> None:
    X = np.random.default_rng(0).standard_normal((6, 3))
    with pytest.raises(ValueError, match="never seen"):
        linear_probe(X[:4], ["a", "b", "a", "b"], X[4:], ["a", "c"])
    with pytest.raises(ValueError, match="2 classes"):
        linear_probe(X[:4], ["a"] * 4, X[4:], ["a", "a"])
    feats = [torch.randn(5, 3) for _ in range(6)]
    with pytest.raises(ValueError, match="never seen"):
        attention_probe(feats[:4], ["a", "b", "a", "b"], feats[4:], ["a", "c"], steps=1)


def test_probes_reject_mismatched_lengths() -> None:
    X = np.zeros((4, 3))
    with pytest.raises(ValueError):
        linear_probe(X, ["a", "b", "a"], X, ["a", "b", "a", "b"])
    with pytest.raises(ValueError):
        clips = [torch.zeros(2, 3)] * 4
        attention_probe(clips, ["a", "b"] * 2, clips[:1], ["a", "b"], steps=1)


def test_mean_pool() -> None:
    feats = [torch.arange(6.0).reshape(3, 2), np.ones((1, 2))]
    np.testing.assert_allclose(mean_pool(feats), [[2.0, 3.0], [1.0, 1.0]])
    with pytest.raises(ValueError):
        mean_pool([np.zeros((0, 2))])


def _one_frame_task(n: int, seed: int) -> tuple[list[torch.Tensor], list[str]]:
    """The label is carried by ONE frame per clip, at a random position, flagged by dim 0.

    Mean pooling divides the label dimension's +-2 by T (60..100 frames) under noise of std
    1/sqrt(T) ~ 0.1, so the best linear rule on means scores ~Phi(0.2) ~ 0.58; a query that
    attends to the flag recovers the full +-2 signal."""
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for _ in range(n):
        t = int(torch.randint(60, 101, (1,), generator=g))
        x = torch.randn(t, 8, generator=g)
        pos = int(torch.randint(0, t, (1,), generator=g))
        sign = 1 if torch.rand(1, generator=g) < 0.5 else -1
        x[pos, 0], x[pos, 1] = 6.0, 2.0 * sign
        feats.append(x)
        labels.append("up" if sign > 0 else "down")
    return feats, labels


def test_attention_probe_finds_a_one_frame_label_that_mean_pooling_dilutes() -> None:
    feats, y = _one_frame_task(1000, seed=0)
    tr, te = slice(0, 600), slice(600, None)
    att = attention_probe(feats[tr], y[tr], feats[te], y[te])
    lin = linear_probe(mean_pool(feats[tr]), y[tr], mean_pool(feats[te]), y[te])
    assert att.accuracy >= 0.95
    assert lin.accuracy <= 0.7
    assert (att.n_train, att.n_test, att.n_classes) == (600, 400, 2)


def test_attention_probe_is_deterministic_given_seed() -> None:
    feats, y = _one_frame_task(400, seed=1)

    # few steps: the probe is mid-training, where any nondeterminism would show in the accuracy
    def run(seed: int):
        return attention_probe(feats[:300], y[:300], feats[300:], y[300:], seed=seed, steps=60)

    a = run(0)
    assert a == run(0)
    assert 0.5 < a.accuracy < 0.95
    assert run(1).accuracy != a.accuracy  # the seed is used (init and batch order)


def test_attention_pool_ignores_padding() -> None:
    torch.manual_seed(0)
    pool = AttentionPool(4, 3)
    with torch.no_grad():
        pool.query.copy_(torch.randn(4) * 5)
    short, long_ = torch.randn(3, 4), torch.randn(7, 4) + 10
    x, mask = _pad([short, long_])
    alone, _ = _pad([short])
    pooled_alone = pool.pool(alone, torch.ones(1, 3, dtype=torch.bool))[0]
    torch.testing.assert_close(pool.pool(x, mask)[0], pooled_alone)


# --------------------------------------------------------------------------------- alignment


def test_cosine() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, -2 * a.numpy()) == pytest.approx(-1.0)
    assert cosine([1.0, 0.0], [0.0, 3.0]) == pytest.approx(0.0)
    assert cosine([0.0, 0.0], [1.0, 1.0]) == 0.0
    rows = rowwise_cosine([[1.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(rows, [1.0, -1.0])
    with pytest.raises(ValueError):
        rowwise_cosine(np.ones((2, 3)), np.ones((3, 3)))


def test_retrieval_identical_shuffled_independent() -> None:
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((500, 32))
    assert retrieval_accuracy(Q, Q) == 1.0
    assert retrieval_accuracy(torch.from_numpy(Q), 3 * Q) == 1.0  # scale does not matter to cosine
    perm = rng.permutation(500)
    # with keys shuffled, only the fixed points of the permutation are retrieved
    assert retrieval_accuracy(Q, Q[perm]) == pytest.approx(np.mean(perm == np.arange(500)))
    assert retrieval_accuracy(Q, rng.standard_normal((500, 32))) <= 5 * retrieval_chance(500)


def test_retrieval_at_k_hand_built() -> None:
    keys = np.eye(3)
    queries = np.array([[0.5, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # query 0 prefers key 1
    assert retrieval_at_k(queries, keys, k=1) == pytest.approx(2 / 3)
    assert retrieval_at_k(queries, keys, k=2) == 1.0


def test_retrieval_of_collapsed_embedding_is_chance() -> None:
    keys = np.random.default_rng(0).standard_normal((50, 8))
    collapsed = np.ones((50, 8))  # every query identical: all keys tie for every query
    assert retrieval_at_k(keys, collapsed, k=1) == pytest.approx(retrieval_chance(50))
    assert retrieval_at_k(keys, collapsed, k=5) == pytest.approx(retrieval_chance(50, k=5))
    assert retrieval_chance(100) == 0.01 and retrieval_chance(100, 5) == 0.05


def test_linear_cka() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2000, 16))
    assert linear_cka(X, X) == pytest.approx(1.0)
    R, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    assert linear_cka(X, 3.7 * X @ R + 5.0) == pytest.approx(1.0)  # rotation, scale, shift
    E, _ = np.linalg.qr(rng.standard_normal((40, 16)))  # isometric embedding into 40 dims
    assert linear_cka(torch.from_numpy(X), X @ E.T) == pytest.approx(1.0)
    assert linear_cka(X, rng.standard_normal((2000, 16))) < 0.05  # ~ sqrt(d1 d2) / N = 0.008
    assert linear_cka(X, X * np.arange(1, 17)) < 0.9  # anisotropic scaling is NOT invariant
    assert linear_cka(X, np.ones((2000, 3))) == 0.0
    with pytest.raises(ValueError):
        linear_cka(X, X[:10])


def test_rms() -> None:
    assert rms(torch.full((4, 5), -3.0)) == pytest.approx(3.0)
    assert rms(np.array([3.0, 4.0])) == pytest.approx(math.sqrt(12.5))


def test_nearest_tokens() -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((100, 16))
    queries = torch.from_numpy(table[[7, 42]] * 5)
    idx, sims = nearest_tokens(queries, table, k=3)
    assert idx.shape == sims.shape == (2, 3)
    assert list(idx[:, 0]) == [7, 42]
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 0)  # sorted, most similar first
    with pytest.raises(ValueError):
        nearest_tokens(queries, table, k=101)


# --------------------------------------------------------------------------------- yardstick


def test_compression_ratio_flags_loops_not_sentences() -> None:
    from omni.model.speech_lm import compression_ratio

    assert compression_ratio("") == 0.0
    assert compression_ratio("the more " * 20) > 2.4  # a repetition loop
    assert compression_ratio("She sells seashells by the seashore.") < 2.4
    assert compression_ratio("the more " * 20) > compression_ratio("the more " * 5)


def test_median_wer_and_summary_hand_computed() -> None:
    from omni.eval.metrics import median_wer, wer_summary

    refs, hyps = ["a b c d", "a b", "a b c"], ["a b c d", "x b", "a x x"]  # per clip 0, 1/2, 2/3
    assert median_wer(refs, hyps) == 0.5
    assert wer_summary(refs, hyps) == {"n": 3.0, "wer": pytest.approx(3 / 9), "median_wer": 0.5, "cer": pytest.approx(3 / 15)}
    # one runaway clip: the corpus WER explodes, the median does not move
    loop = ["a b c d", "a b", "a b c " + "a " * 60]
    assert wer(refs, loop) == pytest.approx(60 / 9) and median_wer(refs, loop) == 0.0


def test_grouped_wer_hand_computed() -> None:
    from omni.eval.metrics import grouped_wer

    refs, hyps = ["a b c d", "a b", "a b c", "x y"], ["a b c d", "x b", "a x x", ""]
    got = grouped_wer(refs, hyps, ["normal", "whisper", "normal", "whisper"])
    assert list(got) == ["normal", "whisper"]
    assert got["normal"]["n"] == 2 and got["normal"]["wer"] == pytest.approx(2 / 7) and got["normal"]["median_wer"] == pytest.approx(1 / 3)
    assert got["whisper"]["wer"] == pytest.approx(3 / 4) and got["whisper"]["median_wer"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="keys"):
        grouped_wer(refs, hyps, ["normal"])
