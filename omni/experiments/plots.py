"""Every matplotlib figure of the notebooks, and their tables. Each figure function returns a Figure;
`show` logs it to the run, shows it in the notebook and closes it. `table` formats a DataFrame for
people (a report is read, not computed with): integers as integers, a missing value as "–" with a
footnote saying what it means, never "nan" or "202.000000". `trend` says in words where a curve went.

Training curves (loss_curves, curve, copy_curves, listening_curves, bars_by); the listening ladder (ladder); ablation grids from a comparison table
(omni.eval.compare: probe_accuracy, grid_metrics, weight_histories, final_weights); embedding maps
(omni.experiments.embedding_viz: embedding_map, embedding_labels, alignment_bars). Points, not bars, where a
difference of a few percent matters: a bar drawn from zero hides it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib.pyplot as plt  # headless: Agg by default; in a kernel: inline
import numpy as np
from IPython.display import display

from omni.eval.layer_probes import ATTRIBUTES, EVAL_SPLITS, PROBES
from omni.eval.texture import TaskScore
from omni.experiments.embedding_viz import KIND_NAMES, STAGES, RunViz, point_label
from omni.track import NullTracker, Tracker


def show(tracker: Tracker | NullTracker, fig, name: str) -> None:
    """Log `fig` to the run (figures/<name>), show it in the notebook, and close it: closed, it is not
    drawn a second time at the end of the cell, and a long notebook does not keep every figure open."""
    tracker.log_figure(fig, name)
    display(fig)
    plt.close(fig)


MISSING = "–"  # a value a table does not have (en dash), explained under the table


def _whole(index):
    """An index (level) of whole floats, such as counts, as integers; anything else unchanged."""
    values = np.asarray(index)
    if values.dtype.kind == "f" and len(values) and np.isfinite(values).all() and (values == np.round(values)).all():
        return index.astype(int)
    return index


def table(df, digits: int = 3, missing: str = "not measured in this run", counts: Sequence[str] = ("n", "clips", "seeds", "n_runs")):
    """`df` as people read it (a pandas Styler): numbers to `digits` decimals, counts as integers (integer
    columns, columns named in `counts`, whole-number index levels such as a group's size), a missing
    value as MISSING with a footnote under the table: "– : {missing}"."""
    import pandas as pd

    df = df.copy()
    if isinstance(df.index, pd.MultiIndex):
        df.index = df.index.set_levels([_whole(level) for level in df.index.levels])
    else:
        df.index = _whole(df.index)

    def name(c) -> str:
        return str(c[-1] if isinstance(c, tuple) else c)

    formats = {}
    for c in df.columns:
        if df[c].dtype.kind in "iu" or (name(c) in counts and df[c].dtype.kind == "f"):
            formats[c] = lambda v: f"{int(v):,}"
        elif df[c].dtype.kind == "f":
            formats[c] = f"{{:.{digits}f}}"
    styler = df.style.format(formats, na_rep=MISSING)
    if df.isna().to_numpy().any():
        styler = styler.set_caption(f"{MISSING} : {missing}").set_table_styles(
            [{"selector": "caption", "props": "caption-side: bottom; font-size: 85%; color: #555; text-align: left"}])
    return styler


def trend(points: Sequence[tuple[int, float]], name: str) -> str:
    """Where a curve of (step, value) points went, in one sentence: first, last, and its lowest."""
    if not points:
        return f"{name}: no intermediate evaluations in this run"
    (s0, v0), (s1, v1) = points[0], points[-1]
    sb, vb = min(points, key=lambda p: p[1])
    if len(points) == 1:
        return f"{name}: {v0:.3f} at step {s0} (one evaluation)"
    low = f"; lowest {vb:.3f} at step {sb}" if sb not in (s0, s1) else ""
    if v1 == v0:
        return f"{name} stayed at {v0:.3f} from step {s0} to step {s1}{low}."
    return f"{name} {'rose' if v1 > v0 else 'fell'} from {v0:.3f} (step {s0}) to {v1:.3f} (step {s1}){low}."


def loss_curves(curves: dict[str, list[float]], title: str = "training loss", ylabel: str = "cross-entropy (nats/token)", hline: float | None = None):
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        ax.plot(range(len(ys)), ys, label=name, lw=1.8)
    if hline is not None:
        ax.axhline(hline, color="grey", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def curve(xs, ys, xlabel: str, ylabel: str, title: str, hline: float | None = None, hline_label: str = ""):
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o", lw=1.8)
    if hline is not None:
        ax.axhline(hline, color="C3", ls="--", lw=1.2, label=hline_label)
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def copy_curves(evals: list[dict]):
    """Copying from context against steps: nats per token on validation passages read once and read
    again right after (left), and the share of repeated random tokens predicted (right)."""
    steps = [e["step"] + 1 for e in evals]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, [e["first_nats"] for e in evals], marker="o", label="first reading")
    a.plot(steps, [e["copy_nats"] for e in evals], marker="o", label="second reading (copying)")
    a.axhline(1.0, color="grey", ls=":", lw=1, label="1 nat/token")
    a.set_xlabel("step"), a.set_ylabel("nats per token"), a.set_title("validation passages")
    a.legend(), a.grid(alpha=0.3)
    b.plot(steps, [e["random_copy"] for e in evals], marker="o", color="C2")
    b.set_ylim(0, 1.02), b.set_xlabel("step"), b.set_ylabel("share of repeated tokens predicted")
    b.set_title("random token spans, read again"), b.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def listening_curves(evals: list[dict], tasks: Sequence[str]):
    """Listening while training (omni.experiments.instruct's watch): per texture task, balanced accuracy
    on held-out voices with their own audio (solid) and with shuffled audio (dashed) against steps;
    the mean over tasks in black. A model that listens pulls the solid line away from the dashed one."""
    evals = [e for e in evals if "watch_texture" in e]
    steps = [e["step"] + 1 for e in evals]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, t in enumerate(t for t in tasks if f"watch_{t}" in (evals[0] if evals else {})):
        ax.plot(steps, [e[f"watch_{t}"] for e in evals], marker="o", ms=3, color=f"C{i}", label=t)
        ax.plot(steps, [e[f"watch_shuffled_{t}"] for e in evals], ls="--", lw=1, color=f"C{i}")
    ax.plot(steps, [e["watch_texture"] for e in evals], color="black", lw=2.5, label="mean")
    ax.plot(steps, [e["watch_shuffled_texture"] for e in evals], color="black", lw=1.5, ls="--", label="mean, shuffled audio")
    ax.set_ylim(0, 1.02), ax.set_xlabel("step"), ax.set_ylabel("balanced accuracy (held-out voices)")
    ax.set_title("listening while training: own audio (solid) vs shuffled audio (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def ladder(rows: Sequence[dict]):
    """The listening ladder (omni.experiments.ladder.Ladder.table()): per texture task, balanced accuracy
    at each rung from the Whisper states to the answer (points joined by a line), the voice tokens beside
    the audio tokens (a hollow marker), the answer with shuffled audio and with silence (crosses), and
    the task's chance (dotted). Where a task's line falls is where its voice is lost."""
    rungs = [("whisper", "Whisper\nstates"), ("audio_tokens", "audio\ntokens"), ("lm_state", "LM state\nat answer"), ("answer", "answer")]
    controls = [("answer, shuffled", "answer,\nshuffled"), ("answer, silence", "answer,\nsilence")]
    controls = [c for c in controls if any(c[0] in r for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, r in enumerate(rows):
        c = f"C{i}"
        ax.plot(range(len(rungs)), [r[k] for k, _ in rungs], marker="o", color=c, label=r["task"])
        if "voice_tokens" in r:
            ax.plot([1], [r["voice_tokens"]], marker="o", mfc="none", ms=10, color=c)
        for j, (k, _) in enumerate(controls):
            ax.plot([len(rungs) + j], [r[k]], marker="x", ms=8, color=c)
        ax.hlines(r.get("chance", float("nan")), -0.2, len(rungs) + len(controls) - 0.8, colors=c, linestyles=":", lw=1)
    ax.set_xticks(range(len(rungs) + len(controls)), [n for _, n in rungs + controls])
    ax.set_ylim(0, 1.02), ax.set_ylabel("balanced accuracy (held-out voices)")
    ax.set_title("where the voice is lost" + (" (hollow: the voice tokens alone)" if any("voice_tokens" in r for r in rows) else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def bars_by(df, columns: list[str], value: str, title: str):
    """Mean of `value` per category, one panel per column present in df."""
    columns = [c for c in columns if c in df]
    fig, axes = plt.subplots(1, max(1, len(columns)), figsize=(3.2 * max(1, len(columns)), 3.4), squeeze=False)
    for ax, col in zip(axes[0], columns):
        means = df.groupby(col)[value].mean().sort_values()
        ax.barh([str(i) for i in means.index], means.values, color="C0")
        ax.set_title(col)
        ax.set_xlabel(value)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def texture_scores(results: Mapping[str, Mapping[str, TaskScore]], title: str = ""):
    """Grouped bars per task (one colour per answerer) with 95% CI whiskers and each task's chance as
    a black tick; returns the matplotlib Figure."""
    tasks = sorted({t for r in results.values() for t in r}, key=lambda t: (t == "texture", t))
    names = list(results)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, len(tasks) * (0.4 + 0.2 * len(names))), 3.6))
    x = np.arange(len(tasks))
    for j, name in enumerate(names):
        s = [results[name].get(t) for t in tasks]
        acc = np.array([v.accuracy if v else np.nan for v in s])
        err = np.array([[v.accuracy - v.lo, v.hi - v.accuracy] if v else [np.nan, np.nan] for v in s]).T
        ax.bar(x - 0.4 + width * (j + 0.5), acc, width, yerr=err, capsize=2, label=name)
    chance = [next((r[t].chance for r in results.values() if t in r), np.nan) for t in tasks]
    ax.hlines(chance, x - 0.45, x + 0.45, colors="black", linewidth=1.5, label="chance")
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 1.0
    fig.tight_layout()
    return fig


def grouped_bars(table, columns: Sequence[str], hline: float | None = None, hline_label: str = "", ylabel: str = ""):
    """One group of bars per row of `table` (its index names the groups), one bar per column; NaN left out."""
    columns = [c for c in columns if c in table]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(table) * max(1, len(columns)) / 2), 3.8))
    width = 0.8 / max(1, len(columns))
    x = np.arange(len(table))
    for i, col in enumerate(columns):
        vals = table[col].astype(float).to_numpy()
        bars = ax.bar(x + (i - (len(columns) - 1) / 2) * width, np.nan_to_num(vals, nan=0.0), width, label=col, color=f"C{i}")
        for b, v in zip(bars, vals):
            if not np.isnan(v):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=1, label=hline_label)
    ax.set_xticks(x, [str(i) for i in table.index], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# ablation grids


def probe_accuracy(table, n_states: int, attributes: Sequence[str] = tuple(ATTRIBUTES)):
    """Accuracy per layer choice, one panel per attribute: both probes, both splits, chance dashed."""
    attributes = [a for a in attributes if any(c.startswith(f"probe.{a}.") for c in table.columns)]
    cols = min(3, max(1, len(attributes)))
    nrows = math.ceil(len(attributes) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.3 * nrows), squeeze=False)
    x = list(range(len(table.index)))
    labels = [str(v) for v in table.index]
    for ax, a in zip(axes.flat, attributes):
        for j, (probe, split) in enumerate((p, s) for p in PROBES for s in EVAL_SPLITS):
            col = f"probe.{a}.{probe}.{split}"
            if col not in table.columns:
                continue
            y = table[col].to_numpy(dtype=float)
            err = table[col + ".std"].fillna(0).to_numpy(dtype=float) if col + ".std" in table.columns else None
            ax.errorbar(x, y, yerr=err, marker="o" if split == "test_seen_voice" else "s", lw=1.5, ms=4, capsize=2,
                        ls="-" if probe == "linear" else "--", color=f"C{j}", label=f"{probe}, {split.replace('_', ' ')}")
        for split, ls in zip(EVAL_SPLITS, (":", "-.")):
            col = f"probe.{a}.chance.{split}"
            if col in table.columns:
                ax.axhline(np.nanmean(table[col].to_numpy(dtype=float)), color="grey", ls=ls, lw=1, label=f"chance, {split.replace('_', ' ')}")
        ax.set_title(a)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(attributes):]:
        ax.axis("off")
    legend: dict[str, object] = {}
    for ax in axes.flat:  # identity has no held-out-voice lines: collect the entries of every panel
        for h, n in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(n, h)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("texture probes: accuracy per layer choice (mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def grid_metrics(table, columns: Sequence[str], title: str, xlabel: str = "layer choice"):
    """One panel per metric column, mean ± std per group."""
    columns = [c for c in columns if c in table.columns]
    fig, axes = plt.subplots(1, max(1, len(columns)), figsize=(4.4 * max(1, len(columns)), 3.4), squeeze=False)
    x = list(range(len(table.index)))
    for ax, c in zip(axes[0], columns):
        err = table[c + ".std"].fillna(0).to_numpy(dtype=float) if c + ".std" in table.columns else None
        # points, not bars: a loss of 4.05 vs 4.16 must not sit on bars drawn from zero
        ax.errorbar(x, table[c].to_numpy(dtype=float), yerr=err, fmt="o", color="C0", capsize=3, ms=5)
        ax.set_xticks(x, [str(v) for v in table.index], rotation=45, ha="right", fontsize=8)
        ax.set_title(c)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def weight_histories(histories: dict[str, list[tuple[int, list[float]]]], title: str):
    """One panel per objective: each state's softmax weight against the training step."""
    names = [n for n, h in histories.items() if h]
    cols = min(4, max(1, len(names)))
    nrows = math.ceil(len(names) / cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(3.8 * cols, 2.9 * nrows), squeeze=False)
    for ax, n in zip(axes.flat, names):
        steps = [s for s, _ in histories[n]]
        w = np.array([v for _, v in histories[n]])
        for i in range(w.shape[1]):
            ax.plot(steps, w[:, i], lw=1.6, color=f"C{i}", label=f"state {i}")
        ax.set_title(n, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, max(0.5, float(w.max()) * 1.1))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if names:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def final_weights(weights: dict[str, np.ndarray], title: str):
    """Final layer weights of several objectives side by side (grouped bars per state)."""
    fig, ax = plt.subplots(figsize=(8, 3.4))
    names = list(weights)
    S = len(next(iter(weights.values()))) if weights else 0
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        ax.bar(np.arange(S) + (j - (len(names) - 1) / 2) * width, weights[n], width, label=n,
               color="black" if n.startswith("content") else f"C{j}")
    ax.set_xticks(range(S), [f"state {i}" for i in range(S)])
    ax.set_ylabel("softmax weight")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# embedding maps


STAGE_COLOURS = {"before": "#e6862a", "after": "#2a6fd6"}


def _text_layer(ax, rv: RunViz, xy: np.ndarray, annotate: int = 0) -> None:
    t = rv.map.kind == 0
    ax.scatter(xy[t, 0], xy[t, 1], s=3, c="#c8c8c8", lw=0, label="LM tokens")
    if annotate:
        counts: dict[int, int] = {}
        for c in rv.clips:
            for i in c.text_ids:
                counts[i] = counts.get(i, 0) + 1
        where = {int(tok): n for n, tok in enumerate(rv.map.pos) if rv.map.kind[n] == 0}
        for tok in sorted(counts, key=lambda i: -counts[i])[:annotate]:
            if tok in where:
                x, y = xy[where[tok]]
                ax.annotate(rv.strings[tok], (x, y), fontsize=6, color="#555")


def embedding_map(rv: RunViz, projection: str = "pca", annotate: int = 12):
    """Before | after panels: LM tokens grey (the most frequent transcript tokens named), audio tokens on top."""
    xy = rv.map.xy[projection]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharex=True, sharey=True)
    for ax, stage in zip(axes, STAGES):
        _text_layer(ax, rv, xy, annotate)
        a = rv.map.kind == KIND_NAMES.index(stage)
        ax.scatter(xy[a, 0], xy[a, 1], s=5, c=STAGE_COLOURS[stage], lw=0, alpha=0.7, label=f"audio tokens {stage} training")
        ax.set_title(f"{stage} training")
        ax.legend(loc="best", fontsize=7, markerscale=3)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{rv.name}: {projection.upper()} of LM token embeddings and audio tokens (one fit for both panels)")
    fig.tight_layout()
    return fig


def embedding_labels(rv: RunViz, projection: str = "pca", labels: tuple[str, ...] = ("voice", "gender", "rate", "pitch", "word"), top_words: int = 10):
    """Rows before / after, one column per label: audio tokens coloured by it over the grey LM tokens."""
    xy = rv.map.xy[projection]
    fig, axes = plt.subplots(2, len(labels), figsize=(3.3 * len(labels), 6.6), squeeze=False)
    for col, label in enumerate(labels):
        values = point_label(rv, label)
        audio = [v for v, k in zip(values, rv.map.kind) if k > 0]
        numeric = audio and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in audio)
        if label == "word":
            counts: dict[str, int] = {}
            for v in audio:
                if v:
                    counts[v] = counts.get(v, 0) + 1
            cats = sorted(counts, key=lambda w: (-counts[w], w))[:top_words]
        else:
            cats = sorted({str(v) for v in audio})
        for row, stage in enumerate(STAGES):
            ax = axes[row, col]
            _text_layer(ax, rv, xy)
            a = np.nonzero(rv.map.kind == KIND_NAMES.index(stage))[0]
            if numeric:
                sc = ax.scatter(xy[a, 0], xy[a, 1], s=5, c=[values[i] for i in a], cmap="viridis", lw=0)
                fig.colorbar(sc, ax=ax, fraction=0.046)
            else:
                cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")  # tab20 pairs look alike
                colour = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
                rest = [i for i in a if str(values[i]) not in colour]
                ax.scatter(xy[rest, 0], xy[rest, 1], s=4, c="#9a9a9a", lw=0, alpha=0.5)
                for c in cats:
                    sel = [i for i in a if str(values[i]) == c]
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=5, color=colour[c], lw=0, label=c or "(silence)")
                if len(cats) <= 12 and row == 0:
                    ax.legend(fontsize=6, markerscale=2.5, loc="best")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label} ({stage})" + (" [top words]" if label == "word" else "") + (f" [{len(cats)} values]" if not numeric and len(cats) > 12 and label != "word" else ""), fontsize=9)
    fig.suptitle(f"{rv.name}: {projection.upper()}, audio tokens by label", y=1.0)
    fig.tight_layout()
    return fig


def alignment_bars(runs: list[RunViz], keys: tuple[str, ...] = ("cos_clip", "retrieval_a2t", "retrieval_t2a", "cka_word")):
    """Bars: each statistic before vs after, per run; the control / chance level as a tick."""
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.4), squeeze=False)
    w = 0.38
    for ax, key in zip(axes[0], keys):
        for j, stage in enumerate(STAGES):
            vals = [r.stats[stage].get(key, np.nan) for r in runs]
            ax.bar(np.arange(len(runs)) + (j - 0.5) * w, vals, w, color=STAGE_COLOURS[stage], label=stage)
            ref = [r.stats[stage].get("retrieval_chance" if key.startswith("retrieval") else f"{key}_control", np.nan) for r in runs]
            ax.scatter(np.arange(len(runs)) + (j - 0.5) * w, ref, marker="_", s=300, color="k", zorder=3,
                       label="chance / control" if j == 0 else None)
        ax.set_xticks(np.arange(len(runs)))
        ax.set_xticklabels([r.name.replace(" ", "\n", 1) for r in runs], fontsize=7)
        ax.set_title(key)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig
