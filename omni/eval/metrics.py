"""Metrics: what the experiments report, in one place so every system is scored the same way.

Design choices
- WER/CER are corpus-level: total edits / total reference words (chars). Averaging per-utterance
  rates over-weights short utterances, so per-utterance values are for inspection only.
- One text normalisation (`normalize_text`) for every system: NFKC, lower-case, punctuation and
  symbols become word breaks, intra-word apostrophes and intra-number "." / "," survive, numbers
  are not spelled out. Whisper's English normaliser (numbers, British spellings) is deliberately
  absent: a light rule is easy to audit, and what matters is that every system gets the same one.
- Edit counts come from jiwer (Levenshtein, unit costs; 1.6x (WER) to 14x (CER) faster than the
  hand-written distance it replaced, same results). jiwer refuses empty references, so the
  empty-reference rule is ours: such a pair adds its hypothesis' words (chars) as insertions and
  nothing to the denominator.
- Probes live in omni.eval.probes, alignment statistics (cosine, retrieval, CKA) in omni.eval.embedding_stats.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Sequence, Union

import jiwer
import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def as_numpy(x: ArrayLike, dtype: type = np.float64) -> np.ndarray:
    """A torch tensor (any device) or an array-like as a numpy array of `dtype`."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.float32).numpy()
    return np.asarray(x, dtype=dtype)


def check_same_length(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} vs {len(b)} items")


# ---------------------------------------------------------------------------------------------
# WER / CER

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


def _edits(refs: list[str], hyps: list[str], unit: str) -> tuple[list[int], list[int]]:
    """Per pair: (edits, reference length) in words or chars, after `normalize_text`."""
    check_same_length(refs, hyps, "refs and hyps differ in length")
    refs, hyps = [normalize_text(r) for r in refs], [normalize_text(h) for h in hyps]
    size = (lambda t: len(t.split())) if unit == "word" else len  # noqa: E731 (chars: single spaces count, as in jiwer)
    edits, lengths = [size(h) for h in hyps], [0] * len(refs)  # an empty reference: every output unit is an insertion
    scored = [i for i, r in enumerate(refs) if r]
    if scored:
        process = jiwer.process_words if unit == "word" else jiwer.process_characters
        out = process([refs[i] for i in scored], [hyps[i] for i in scored])
        for i, chunks in zip(scored, out.alignments):
            edits[i] = sum(max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx) for c in chunks if c.type != "equal")
            lengths[i] = size(refs[i])
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
# Yardstick: per-clip medians, scores per group of clips (the loop guard's repetition test is
# omni.model.speech_lm.compression_ratio)


def median_wer(refs: list[str], hyps: list[str]) -> float:
    """Median of the per-clip WERs: a few runaway hypotheses (WER 10+ each) move the corpus WER
    a lot and the median not at all, so the two together tell loops from content errors."""
    return float(np.median(per_utterance_wer(refs, hyps)))


def wer_summary(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """{"n", "wer" (corpus), "median_wer", "cer" (corpus)} of one system on one set of clips."""
    return {"n": float(len(refs)), "wer": wer(refs, hyps), "median_wer": median_wer(refs, hyps), "cer": cer(refs, hyps)}


def grouped_wer(refs: list[str], hyps: list[str], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """`wer_summary` of each group of clips sharing a key (e.g. the clips' style), keys sorted."""
    check_same_length(refs, keys, "refs and keys differ in length")
    out = {}
    for key in sorted(set(keys)):
        idx = [i for i, k in enumerate(keys) if k == key]
        out[key] = wer_summary([refs[i] for i in idx], [hyps[i] for i in idx])
    return out
