"""Texture probes per Whisper layer choice, read from the feature cache (Whisper never runs here).

One layer choice (a state index, "last", "middle", "weighted", "weighted_ln") is probed for voice
identity, gender, accent, rate bucket, pitch bucket and style: fit on split "train", scored on
"test_seen_voice" (new sentences, seen voices) and, except for voice identity, on "test" (new
sentences, unseen voices), with the majority-class chance beside each.

Design choices:
- Probe features are cheap by construction: every state of every clip is mean-pooled ONCE per
  cache and kept beside it (`pooled.v1.safetensors`: the plain frame mean and the mean of
  layer-normed frames); a fixed-state linear probe then reads a (N, d) slice.
- `weighted` / `weighted_ln` choices fit omni.eval.probes.weighted_linear_probe: the texture objective's
  layer weights (for weighted_ln: the mix of pooled layer-normed frames).
- The attention probe reads frames average-pooled by `attn_stride` (default 4: 12.5 per second,
  the projector's default token rate), which cuts its memory 4x; for weighted choices it reads the
  mix with the texture weights its attribute's linear probe learned (one joint fit per attribute).
- Test clips whose label never occurs in train cannot be scored by a probe; they are dropped and
  COUNTED (`probe.<attr>.dropped.<split>`): zero on the default corpus, non-zero only on toy ones.

Metric names (split: the corpus split scored, test_seen_voice or test):
    probe.<attr>.<linear|attention|chance>.<split>   accuracy / majority rate
    probe.<attr>.n_test.<split>, probe.<attr>.dropped.<split>
    probe.<attr>.weight.<i>             texture-objective layer weights (weighted choices; history by L-BFGS iteration)
    time.probe.linear / time.probe.attention   seconds per probe (one attribute, both splits); time.frames
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from omni.common import atomic_save, torch_threads
from omni.data.features import FeatureCache
from omni.eval.probes import ProbeResult, attention_probe_sets, linear_probe_sets, weighted_linear_probe
from omni.model.encoder import LayerSelect

# attribute -> the manifest label it reads
ATTRIBUTES = {"voice": "speaker", "gender": "gender", "accent": "accent", "rate": "rate_bucket",
              "pitch": "pitch_bucket", "style": "style"}
EVAL_SPLITS = ("test_seen_voice", "test")  # corpus splits a probe is scored on (metric names use them as they are)
IDENTITY = {"voice"}  # classes are the voices themselves: no held-out-voice (`test`) score
PROBES = ("linear", "attention")
POOLED_FILE = "pooled.v1.safetensors"


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:])  # parameter-free, as LayerSelect("weighted_ln")


def pooled_states(cache: FeatureCache, chunk: int = 256) -> dict[str, np.ndarray]:
    """{"mean": (N, S, d), "mean_ln": (N, S, d)} float32 for every row of the cache: each state's
    mean over the clip's frames, and the mean of its layer-normed frames. Computed once and stored
    in the cache folder (atomically); views made by `subset` pick their rows from it."""
    f = cache.path / POOLED_FILE
    full = FeatureCache.open(cache.path)
    if f.exists():
        t = load_file(f)
    else:
        means, means_ln = [], []
        with torch_threads(1):
            for i in range(0, len(full), chunk):
                for s in full.load_states(range(i, min(i + chunk, len(full)))):
                    x = s.float()  # (S, T, d)
                    means.append(x.mean(1))
                    means_ln.append(_layer_norm(x).mean(1))
        t = {"mean": torch.stack(means), "mean_ln": torch.stack(means_ln)}
        atomic_save(f, lambda tmp: save_file(t, tmp))
    out = {k: v.numpy() for k, v in t.items()}
    if len(cache) != len(full) or cache.rows is not full.rows:  # a subset view: pick its rows
        where = {(r["shard"], r["offset"]): i for i, r in enumerate(full.rows)}
        idx = np.array([where[(r["shard"], r["offset"])] for r in cache.rows], dtype=np.int64)
        out = {k: v[idx] for k, v in out.items()}
    return out


def _stride_pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    """(T, d) -> (ceil(T / stride), d): mean of each run of `stride` frames (the last may be short)."""
    if stride <= 1:
        return x
    T = x.shape[0]
    n = T // stride
    parts = [x[: n * stride].reshape(n, stride, -1).mean(1)] if n else []
    if T > n * stride:
        parts.append(x[n * stride :].mean(0, keepdim=True))
    return torch.cat(parts)


def frame_features(cache: FeatureCache, rows: Sequence[int], layer: int | np.ndarray, ln: bool = False,
                   stride: int = 4, chunk: int = 128) -> list[torch.Tensor]:
    """Per clip (ceil(T / stride), d) float32 frames of one state (int) or of the mix
    sum_s w[s] * state_s (w an (S,) array of weights; `ln`: layer-norm each state first)."""
    out = []
    mix = None if isinstance(layer, (int, np.integer)) else torch.as_tensor(np.asarray(layer), dtype=torch.float32)
    layers = [int(layer)] if mix is None else None
    with torch_threads(1):
        for i in range(0, len(rows), chunk):
            for s in cache.load_states(rows[i : i + chunk], layers=layers):
                x = s.float()
                if mix is None:
                    x = x[0]
                else:
                    x = torch.einsum("s,std->td", mix, _layer_norm(x) if ln else x)
                out.append(_stride_pool(x, stride))
    return out


def choice_index(layer: str | int, n_states: int) -> int | None:
    """The state index a fixed choice reads (None for weighted ones); validated by LayerSelect."""
    return LayerSelect(layer if not isinstance(layer, str) or not layer.lstrip("-").isdigit() else int(layer), n_states).index


def layer_choices(n_states: int) -> list[str]:
    """Every layer choice of an encoder with n_states hidden states, in report order."""
    return [str(i) for i in range(n_states)] + list(LayerSelect.NAMES)


@dataclass
class LayerProbes:
    layer: str
    n_states: int
    scores: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (attr, probe|chance|n_test|dropped, split)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # attr -> texture weights (weighted choices)
    history: dict[str, list[tuple[int, list[float]]]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)  # probe kind -> seconds per probe

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: scores, final texture weights, seconds per probe."""
        m = {f"probe.{a}.{p}.{s}": v for (a, p, s), v in self.scores.items()}
        for a, w in self.weights.items():
            m |= {f"probe.{a}.weight.{i}": float(x) for i, x in enumerate(w)}
        for kind, secs in self.seconds.items():
            if secs:
                m[f"time.probe.{kind}" if kind in PROBES else f"time.{kind}"] = float(np.mean(secs) if kind in PROBES else np.sum(secs))
        return m

    def table(self):
        """DataFrame indexed by (attribute, split): each probe's accuracy, chance and n_test."""
        import pandas as pd

        kinds = [k for k in PROBES if any(p == k for _, p, _ in self.scores)]
        rows = [{"attribute": a, "split": s, **{p: self.scores.get((a, p, s)) for p in (*kinds, "chance")}, "n_test": self.scores[(a, "n_test", s)]}
                for a in ATTRIBUTES for s in EVAL_SPLITS if (a, "chance", s) in self.scores]
        return pd.DataFrame(rows).set_index(["attribute", "split"])

    def log(self, tracker) -> None:
        """Everything into one run; texture weights with their history (step = optimiser step)."""
        for a, hist in self.history.items():
            for step, w in hist:
                tracker.log_metrics({f"probe.{a}.weight.{i}": x for i, x in enumerate(w)}, step=step)
        tracker.log_metrics({k: v for k, v in self.metrics().items() if ".weight." not in k})
        tracker.flush()


def _label(cache: FeatureCache, rows: Sequence[int], attr: str) -> list:
    key = ATTRIBUTES[attr]
    return [cache.rows[r]["labels"][key] for r in rows]


def run_probes(cache: FeatureCache, layer: str | int, attributes: Sequence[str] = tuple(ATTRIBUTES), seed: int = 0,
               probes: Sequence[str] = PROBES, attn_stride: int = 4, attn_steps: int = 200,
               weighted_steps: int = 100, log=print) -> LayerProbes:
    """Every texture probe of one layer choice (see the module docstring for the splits)."""
    unknown = sorted(set(attributes) - set(ATTRIBUTES)) + sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown attributes/probes {unknown}; attributes: {list(ATTRIBUTES)}, probes: {list(PROBES)}")
    layer = str(layer)
    S = cache.n_states
    index = choice_index(layer, S)
    ln = layer == "weighted_ln"
    out = LayerProbes(layer, S, seconds={p: [] for p in probes})
    pooled = pooled_states(cache)["mean_ln" if ln else "mean"]
    train = cache.select(split="train")
    if not train:
        raise ValueError(f"{cache.path}: no rows with split=train")
    # per attribute and eval split: the test rows a probe can score (label seen in train)
    plans: dict[str, dict[str, list[int]]] = {}
    for a in attributes:
        seen_labels = set(_label(cache, train, a))
        if len(seen_labels) < 2:
            log(f"probe {a}: skipped, fewer than 2 classes in train")
            continue
        plans[a] = {}
        for split in EVAL_SPLITS:
            if a in IDENTITY and split == "test":
                continue
            rows = cache.select(split=split)
            keep = [r for r, y in zip(rows, _label(cache, rows, a)) if y in seen_labels]
            out.scores[(a, "n_test", split)] = len(keep)
            out.scores[(a, "dropped", split)] = len(rows) - len(keep)
            if keep:
                plans[a][split] = keep

    def record(a: str, kind: str, name: str, res: ProbeResult) -> None:
        out.scores[(a, kind, name)] = res.accuracy
        out.scores[(a, "chance", name)] = res.chance

    # linear: fixed state -> sklearn on the pooled slice; weighted -> joint texture weights
    if "linear" in probes or index is None:
        for a, plan in plans.items():
            ytr = _label(cache, train, a)
            t0 = time.perf_counter()
            if index is None:
                tests = [(pooled[rows], _label(cache, rows, a)) for rows in plan.values()]
                wp = weighted_linear_probe(pooled[train], ytr, tests, seed=seed, steps=weighted_steps)
                results = wp.results
                out.weights[a], out.history[a] = wp.weights, wp.history
            else:
                tests = [(pooled[rows, index], _label(cache, rows, a)) for rows in plan.values()]
                results = linear_probe_sets(pooled[train, index], ytr, tests, seed=seed)
            for name, res in zip(plan, results):
                record(a, "linear", name, res)
            if "linear" in probes:
                out.seconds["linear"].append(time.perf_counter() - t0)
    if "attention" in probes:
        t0 = time.perf_counter()
        everything = train + sorted({r for plan in plans.values() for rows in plan.values() for r in rows})
        pos = {r: i for i, r in enumerate(everything)}
        shared = frame_features(cache, everything, index, stride=attn_stride) if index is not None else None
        out.seconds["frames"] = [time.perf_counter() - t0]
        for a, plan in plans.items():
            feats = shared
            if feats is None:  # the mix this attribute's texture objective chose
                t1 = time.perf_counter()
                feats = frame_features(cache, everything, out.weights[a], ln=ln, stride=attn_stride)
                out.seconds["frames"].append(time.perf_counter() - t1)
            t1 = time.perf_counter()
            tests = [([feats[pos[r]] for r in rows], _label(cache, rows, a)) for rows in plan.values()]
            results = attention_probe_sets([feats[pos[r]] for r in train], _label(cache, train, a), tests,
                                                   seed=seed, steps=attn_steps)
            for name, res in zip(plan, results):
                record(a, "attention", name, res)
            out.seconds["attention"].append(time.perf_counter() - t1)
    return out
