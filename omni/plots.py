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
