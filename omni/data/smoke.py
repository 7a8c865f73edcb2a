"""Smoke clips: five 5-second synthetic tones whose captions say what they are.

The manifest (`data/audio_smoke/manifest.jsonl`) is committed; it holds each clip's caption and
the recipe of its signal (`kind`, `f0`, `f1`, `seconds`). The wavs are git-ignored and rebuilt
from those fields, bit-identically, by `ensure_clips` (or `python -m omni.data.smoke`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from omni.data import audio

SMOKE_MANIFEST = Path("data/audio_smoke/manifest.jsonl")
KINDS = ("steady", "sweep", "beeps", "tremolo", "chord")


def tone(kind: str, f0: float, f1: float, seconds: float, seed: int) -> np.ndarray:
    """One clip's signal at 16 kHz, peak 0.5; a little seeded noise so no clip is a pure sinusoid."""
    sr = audio.SAMPLE_RATE
    t = np.arange(int(seconds * sr)) / sr
    if kind == "steady":
        x = np.sin(2 * np.pi * f0 * t)
    elif kind == "sweep":  # linear chirp f0 -> f1: phase is the integral of the frequency
        x = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
    elif kind == "beeps":  # f1 beeps per second at f0, 50% duty cycle
        x = np.sin(2 * np.pi * f0 * t) * (np.sin(2 * np.pi * f1 * t) > 0)
    elif kind == "tremolo":  # amplitude modulated at f1 Hz
        x = np.sin(2 * np.pi * f0 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * f1 * t))
    elif kind == "chord":
        x = np.sin(2 * np.pi * f0 * t) + np.sin(2 * np.pi * f1 * t) + np.sin(2 * np.pi * 1.5 * f0 * t)
    else:
        raise ValueError(f"smoke clip kind {kind!r} is not one of {KINDS}")
    x = x + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def ensure_clips(manifest: str | Path = SMOKE_MANIFEST) -> list[Path]:
    """Write any missing wav named by the manifest; return all clip paths."""
    manifest = Path(manifest)
    paths = []
    for i, line in enumerate(manifest.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        path = manifest.parent / row["audio"]
        if not path.exists():
            x = tone(row["kind"], row["f0"], row["f1"], row["seconds"], seed=i)
            audio.save(path, torch.from_numpy(x))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in ensure_clips(sys.argv[1] if len(sys.argv) > 1 else SMOKE_MANIFEST):
        print(p)
