"""Plots shared by the notebooks. Each returns a matplotlib Figure; the caller shows or logs it."""

from __future__ import annotations

import matplotlib.pyplot as plt  # headless: Agg by default; in a kernel: inline


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
