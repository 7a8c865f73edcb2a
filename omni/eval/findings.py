"""Findings of a grid: sentences with their numbers, computed from the comparison table (omni.eval.compare).

Design choices:
- Best single state vs the last state per attribute / probe / split, with a two-standard-error
  check: binomial s.e. from the test-set size for probes (deterministic up to optimiser noise: the
  test set is the uncertainty that matters), s.e. of the seed mean for content.
- Content vs texture layer weights for weighted / weighted_ln: argmax state, total-variation
  distance (0 = same weights, 1 = disjoint), and each objective's distance from the uniform start.
- Each Finding carries its numbers as metrics too (`finding.<...>`), for the grid's parent run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from omni.eval.layer_probes import ATTRIBUTES, EVAL_SPLITS, PROBES
from omni.model.encoder import LayerSelect


def _se(p: float, n: float) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n and n > 0 and not math.isnan(p) else float("nan")


@dataclass
class Finding:
    text: str  # the sentence, numbers filled in from the table
    metrics: dict[str, float]  # the same numbers, for the parent run


def _get(table, row, col) -> float:
    try:
        v = table.loc[row, col]
    except KeyError:
        return float("nan")
    return float(v) if v is not None else float("nan")


def single_states(table, n_states: int) -> dict[str, int]:
    """Rows of a layer table that read ONE state -> that state's index ("last"/"middle" count
    when the same state is not also there under its number)."""
    out = {str(i): i for i in range(n_states) if str(i) in table.index}
    for alias, i in (("middle", n_states // 2), ("last", n_states - 1)):
        if alias in table.index and i not in out.values():
            out[alias] = i
    return out


def last_row(table, n_states: int) -> str | None:
    """The row that reads the last state: "last", else its index."""
    return "last" if "last" in table.index else str(n_states - 1) if str(n_states - 1) in table.index else None


def probe_findings(table, n_states: int, attributes: Sequence[str] = tuple(ATTRIBUTES)) -> list[Finding]:
    """Per attribute, probe and split: the best single state vs the last state, the gap and
    whether it exceeds two binomial standard errors of the difference (probes are deterministic
    up to optimiser noise: the test-set size is the uncertainty that matters)."""
    out = []
    singles = single_states(table, n_states)
    last = last_row(table, n_states)
    if not singles or last is None:
        return out
    for a in attributes:
        for probe in PROBES:
            for split in EVAL_SPLITS:
                col = f"probe.{a}.{probe}.{split}"
                if col not in table.columns:
                    continue
                accs = {r: _get(table, r, col) for r in singles}
                accs = {r: v for r, v in accs.items() if not math.isnan(v)}
                if not accs or math.isnan(_get(table, last, col)):
                    continue
                best = max(accs, key=lambda r: (accs[r], -singles[r]))
                ref = _get(table, last, col)
                n = _get(table, last, f"probe.{a}.n_test.{split}")
                chance = _get(table, last, f"probe.{a}.chance.{split}")
                gap = accs[best] - ref
                se = math.hypot(_se(accs[best], n), _se(ref, n))
                sig = bool(gap > 2 * se) if not math.isnan(se) else False
                extra = "".join(f", {w} {_get(table, w, col):.3f}" for w in LayerSelect.WEIGHTED
                                if w in table.index and not math.isnan(_get(table, w, col)))
                name = f"state {singles[best]}" + (f" ({best})" if not best.isdigit() else "")
                text = (f"{a} / {probe} / {split.replace('_', ' ')}: best {name} {accs[best]:.3f} vs last state "
                        f"{n_states - 1} {ref:.3f}: gap {gap:+.3f}"
                        + (f" ({'more' if sig else 'less'} than 2 s.e. = {2 * se:.3f}, n={n:.0f})" if not math.isnan(se) else "")
                        + f"; chance {chance:.3f}{extra}")
                key = f"finding.{a}.{probe}.{split}"
                out.append(Finding(text, {f"{key}.best_state": float(singles[best]), f"{key}.best": accs[best],
                                          f"{key}.gap_to_last": gap, f"{key}.significant": float(sig)}))
    return out


def content_findings(table, reference, metric: str = "content.wer", lower_is_better: bool = True,
                     candidates: Sequence | None = None) -> list[Finding]:
    """The best group by `metric` (mean over seeds) vs `reference` (e.g. the last layer): the gap,
    and whether it exceeds two standard errors of the difference of the two means."""
    if metric not in table.columns or reference not in table.index:
        return []
    cands = [c for c in (candidates if candidates is not None else table.index) if c in table.index]
    vals = {c: _get(table, c, metric) for c in cands}
    vals = {c: v for c, v in vals.items() if not math.isnan(v)}
    if not vals:
        return []
    best = (min if lower_is_better else max)(vals, key=lambda c: vals[c])
    ref = _get(table, reference, metric)
    gap = ref - vals[best] if lower_is_better else vals[best] - ref

    def sem(c):
        sd, n = _get(table, c, metric + ".std"), _get(table, c, "n_runs")
        return sd / math.sqrt(n) if n > 1 and not math.isnan(sd) else float("nan")

    se = math.hypot(sem(best), sem(reference))
    sig = "" if math.isnan(se) else f", {'more' if abs(gap) > 2 * se else 'less'} than 2 s.e. = {2 * se:.3f}"
    sd_b, sd_r = _get(table, best, metric + ".std"), _get(table, reference, metric + ".std")
    fmt = lambda v, sd: f"{v:.3f}" + ("" if math.isnan(sd) else f" ± {sd:.3f}")  # noqa: E731
    verdict = "better" if gap > 0 else "worse" if gap < 0 else "equal"
    order = sorted(vals, key=lambda c: vals[c], reverse=not lower_is_better)
    same = gap == 0 and len(order) > 1 and (best == reference or vals[best] == ref)
    if same:  # the reference (or its alias) is the best: how far behind is the runner-up?
        runner = next((c for c in order if vals[c] != vals[best]), order[1])
        margin = abs(vals[runner] - vals[best])
        se2 = math.hypot(sem(best), sem(runner))
        sig2 = "" if math.isnan(se2) else f", {'more' if margin > 2 * se2 else 'less'} than 2 s.e. = {2 * se2:.3f}"
        tail = f"the reference is the best; runner-up {runner} {fmt(vals[runner], _get(table, runner, metric + '.std'))}, behind by {margin:.3f}{sig2}"
    else:
        tail = f"{verdict} by {abs(gap):.3f}{sig}"
    text = (f"{metric}: {'lowest' if lower_is_better else 'highest'} among {', '.join(map(str, cands))}: {best} "
            f"{fmt(vals[best], sd_b)} vs {reference} {fmt(ref, sd_r)}: {tail} ({_get(table, best, 'n_runs'):.0f} seed(s))")
    key = f"finding.{metric}"
    reference = re.sub(r"[^\w\-. /]", "_", str(reference))  # MLflow metric names: no "=" (variant grids)
    return [Finding(text, {f"{key}.gap_to_{reference}": gap, f"{key}.significant": float(not math.isnan(se) and gap > 2 * se)})]


def weights_of(table, row, prefix: str, n_states: int) -> np.ndarray | None:
    """(S,) mean final weights `prefix<i>` of one table row, or None if absent."""
    cols = [f"{prefix}{i}" for i in range(n_states)]
    if row not in table.index or not all(c in table.columns for c in cols):
        return None
    w = np.array([_get(table, row, c) for c in cols])
    return None if np.isnan(w).any() else w


def weight_findings(table, n_states: int, attributes: Sequence[str] = tuple(ATTRIBUTES)) -> list[Finding]:
    """For weighted / weighted_ln: where the content objective (alignment) puts its weight vs where
    each texture objective (probe) puts it: argmax state, total-variation distance to the content
    weights (0 = same weights, 1 = disjoint; uniform vs one-hot is 1 - 1/S), and each objective's
    distance from the uniform start (a short alignment budget leaves the content weights near it)."""
    out = []
    for w in LayerSelect.WEIGHTED:
        content = weights_of(table, w, "content.layer_weight.", n_states)
        texture = {a: weights_of(table, w, f"probe.{a}.weight.", n_states) for a in attributes}
        texture = {a: t for a, t in texture.items() if t is not None}
        if content is None and not texture:
            continue
        parts, m = [], {}
        uniform = np.full(n_states, 1.0 / n_states)

        def moved(v: np.ndarray) -> str:  # from the zero-logit start: how far, and toward which state
            return f"TV from uniform {0.5 * float(np.abs(v - uniform).sum()):.2f}"

        if content is not None:
            parts.append(f"content objective: state {int(content.argmax())} ({content.max():.2f}), {moved(content)}")
            m[f"finding.{w}.content.argmax"] = float(content.argmax())
            m[f"finding.{w}.content.tv_from_uniform"] = 0.5 * float(np.abs(content - uniform).sum())
        for a, t in texture.items():
            s = f"{a}: state {int(t.argmax())} ({t.max():.2f}), {moved(t)}"
            m[f"finding.{w}.{a}.argmax"] = float(t.argmax())
            if content is not None:
                tv = 0.5 * float(np.abs(t - content).sum())
                s += f", TV to content {tv:.2f}"
                m[f"finding.{w}.{a}.tv_to_content"] = tv
            parts.append(s)
        if content is not None and texture:
            differ = sum(int(t.argmax()) != int(content.argmax()) for t in texture.values())
            parts.append(f"the argmax differs from the content objective's for {differ} of {len(texture)} texture objectives")
            m[f"finding.{w}.argmax_differs"] = float(differ)
        out.append(Finding(f"{w}: " + "; ".join(parts), m))
    return out



def grid_findings(table, by: Sequence[str], n_states: int | None, reference: str) -> list[Finding]:
    """Every finding of a grid's table: probes per state, content against `reference` (for a layer
    grid: the single states, then the learned mixes; otherwise what each variant costs in audio
    tokens per second and training throughput), and the content vs texture layer weights."""
    out: list[Finding] = []
    layer_grid = list(by) == ["layer"]
    if n_states and any(c.startswith("probe.") for c in table.columns):
        out += probe_findings(table, n_states)
    if "content.wer" in table.columns:
        singles = list(single_states(table, n_states)) if layer_grid and n_states else None
        out += content_findings(table, reference, "content.wer", candidates=singles)
        out += content_findings(table, reference, "content.test_loss", candidates=singles)
        if layer_grid:
            out += content_findings(table, reference, "content.wer", candidates=[w for w in LayerSelect.WEIGHTED if w in table.index])
        else:
            out += content_findings(table, reference, "content.tokens_per_s", lower_is_better=False)
            if {"content.audio_tokens_per_s", "content.tokens_per_s"} <= set(table.columns):
                out += [Finding(f"{v}: {table.loc[v, 'content.audio_tokens_per_s']:.1f} audio tokens per second of speech, "
                                f"{table.loc[v, 'content.tokens_per_s']:.0f} training tokens/s, WER {table.loc[v, 'content.wer']:.3f}", {})
                        for v in table.index]
    if n_states:
        out += weight_findings(table, n_states)
    return out
