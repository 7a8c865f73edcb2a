"""Layer-choice and projector ablations: which Whisper state carries what.

One grid point = one layer choice (a state index, "last", "middle", "weighted", "weighted_ln"),
measured two ways, both from the feature cache (Whisper never runs in a grid point):
- texture: probes for voice identity, gender, accent, rate bucket, pitch bucket and style, fit on
  split "train" and scored on "test_seen_voice" (new sentences, seen voices) and, except for voice
  identity, on "test" (new sentences, unseen voices), with the majority-class chance beside each;
- content: projector-only alignment into the frozen LM (omni.align) at a fixed budget.
The summary notebook rebuilds the comparison from MLflow (`child_runs` -> `comparison` ->
`findings`), so every number in the report is a child run's metric.

Design choices:
- Probe features are cheap by construction: every state of every clip is mean-pooled ONCE per
  cache and kept beside it (`pooled.v1.safetensors`: the plain frame mean and the mean of
  layer-normed frames); a fixed-state linear probe then reads a (N, d) slice.
- `weighted` / `weighted_ln` probes mirror omni.encoder.LayerSelect exactly: softmax over
  zero-initialised per-state logits, trained jointly with the classifier on the texture objective.
  Mean pooling commutes with a weighted sum, so the mix of pooled states IS the pooled mix (for
  weighted_ln: the mix of pooled layer-normed frames). Same objective and optimiser (full-batch
  L-BFGS) as the fixed-state linear probe, which it reproduces with one-hot weights: a weighted
  score differs from a single-state score because of the features, not the fitting.
- The attention probe reads frames average-pooled by `attn_stride` (default 4: 12.5 per second,
  the projector's default token rate), which cuts its memory 4x; for weighted choices it reads the
  mix with the texture weights its attribute's linear probe learned (one joint fit per attribute).
- Test clips whose label never occurs in train cannot be scored by a probe; they are dropped and
  COUNTED (`probe.<attr>.dropped.<split>`): zero on the default corpus, non-zero only on toy ones.
- `prepare` builds the corpus and the cache under a file lock: parallel grid workers wait for the
  first one instead of encoding twice.
- "last" and "middle" are aliases of a state index: when the grid already finished that index
  with the same settings, the alias point copies its metrics (`alias_source`, `copy_run_metrics`;
  tag omni.alias_of) instead of recomputing identical numbers.
- Findings are computed from the comparison table: best single state vs the last state per
  attribute/probe/split with a two-standard-error check (binomial s.e. from the test-set size for
  probes, s.e. of the seed mean for content), and the content vs texture layer weights (argmax,
  total-variation distance).

Metric names (one MLflow run per grid point):
    probe.<attr>.<linear|attention|chance>.<seen_voice|heldout_voice>   accuracy / majority rate
    probe.<attr>.n_test.<split>, probe.<attr>.dropped.<split>
    probe.<attr>.weight.<i>             texture-objective layer weights (weighted choices; history by L-BFGS iteration)
    content.<name>                      omni.align's metrics with the prefix (wer, cer, test_loss, control_wer,
                                        tokens_per_s, step_seconds, loss by step, layer_weight.<i> by step, ...)
                                        + content.audio_tokens_per_s
    time.<what>                         seconds: prepare, probes, content, total per point; time.probe.linear /
                                        time.probe.attention per probe (one attribute, both splits)
    data.n_states, data.n_clips, data.cache_built_here
  in the parent run (05_ablation_report): finding.<...> and grid.wall_seconds, grid.mean_time.<what>.
attr: voice, gender, accent, rate, pitch, style.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from omni import metrics
from omni.data.features import FeatureCache

# attribute -> the manifest label it reads
ATTRIBUTES = {"voice": "speaker", "gender": "gender", "accent": "accent", "rate": "rate_bucket",
              "pitch": "pitch_bucket", "style": "style"}
# metric split name -> corpus split
EVAL_SPLITS = {"seen_voice": "test_seen_voice", "heldout_voice": "test"}
IDENTITY = {"voice"}  # classes are the voices themselves: no held-out-voice score
PROBES = ("linear", "attention")
WEIGHTED = ("weighted", "weighted_ln")
POOLED_FILE = "pooled.v1.safetensors"


# ---------------------------------------------------------------------------------------------
# data: corpus + cache, built once


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(corpus: str | Path = "data/synth", sentences: int = 3000, encoder: str = "tiny.en", mode: str = "var",
            features: str | Path = "cache/features", seed: int = 0, workers: int = 1) -> Path:
    """The feature cache folder of `corpus`, building the corpus (omni.data.synth, only when it has
    no manifest: an existing corpus is used as it is) and the cache (omni.data.features) if missing.

    Idempotent, and safe to call from parallel grid workers: the first holds a lock while it
    builds, the others wait and then find everything in place."""
    from omni.data.features import build_features
    from omni.data.synth import SynthConfig, build_corpus

    corpus = Path(corpus)
    with _locked(corpus.parent / f".{corpus.name}.prepare.lock"):
        if not (corpus / "manifest.jsonl").exists():
            build_corpus(SynthConfig(out=str(corpus), n_sentences=sentences, seed=seed, workers=workers))
        return build_features(corpus / "manifest.jsonl", features, encoder, mode=mode, progress=False)


def subset(cache: FeatureCache, max_rows: dict[str, int]) -> FeatureCache:
    """A view of `cache` keeping at most max_rows[split] rows of each split named (first ones, in
    cache order; 0 drops the split); other splits are kept whole. Rows point into the same shards."""
    seen: dict[str, int] = {}
    rows = []
    for r in cache.rows:
        s = r["labels"].get("split")
        if s in max_rows:
            seen[s] = seen.get(s, 0) + 1
            if seen[s] > max_rows[s]:
                continue
        rows.append(r)
    return FeatureCache(cache.path, dict(cache.index, rows=rows))


# ---------------------------------------------------------------------------------------------
# pooled features: every state of every clip, mean-pooled once per cache


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
        with metrics._torch_threads(1):
            for i in range(0, len(full), chunk):
                for s in full.load_states(range(i, min(i + chunk, len(full)))):
                    x = s.float()  # (S, T, d)
                    means.append(x.mean(1))
                    means_ln.append(_layer_norm(x).mean(1))
        t = {"mean": torch.stack(means), "mean_ln": torch.stack(means_ln)}
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        save_file(t, tmp)
        os.replace(tmp, f)
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
    with metrics._torch_threads(1):
        for i in range(0, len(rows), chunk):
            for s in cache.load_states(rows[i : i + chunk], layers=layers):
                x = s.float()
                if mix is None:
                    x = x[0]
                else:
                    x = torch.einsum("s,std->td", mix, _layer_norm(x) if ln else x)
                out.append(_stride_pool(x, stride))
    return out


# ---------------------------------------------------------------------------------------------
# probes


def choice_index(layer: str | int, n_states: int) -> int | None:
    """The state index a fixed choice reads (None for weighted ones); validated by LayerSelect."""
    from omni.encoder import LayerSelect

    return LayerSelect(layer if not isinstance(layer, str) or not layer.lstrip("-").isdigit() else int(layer), n_states).index


def layer_choices(n_states: int) -> list[str]:
    """Every layer choice of an encoder with n_states hidden states, in report order."""
    return [str(i) for i in range(n_states)] + ["middle", "last", *WEIGHTED]


@dataclass
class WeightedProbe:
    result: metrics.ProbeResult  # on the first test set
    results: list[metrics.ProbeResult]  # one per test set
    weights: np.ndarray  # (S,) final softmax weights
    history: list[tuple[int, list[float]]]  # (L-BFGS iteration, softmax weights), from 0


def weighted_linear_probe(X_train: np.ndarray, y_train: Sequence, tests: Sequence[tuple[np.ndarray, Sequence]],
                          seed: int = 0, steps: int = 100, C: float = 1.0, threads: int | None = 1) -> WeightedProbe:
    """Logistic regression on sum_s softmax(w)_s X[:, s] (X: (N, S, d) pooled states), with w
    learned jointly: the texture objective's layer weights.

    The objective is `metrics.linear_probe`'s (mean cross-entropy + ||W||^2 / (2 C N), features
    standardised with train statistics, here of the mixed features) and so is the optimiser:
    full-batch L-BFGS, at most `steps` iterations, the weights recorded at each. With w fixed one-hot it
    reproduces the fixed-state probe (0.727 vs sklearn's 0.723 on voice identity); Adam with early
    stopping did not (its implicit regularisation moved held-out scores by up to 0.19). w starts at
    zero (plain average), as LayerSelect. `seed` is unused: the fit is deterministic."""
    if not tests:
        raise ValueError("need at least one (X_test, y_test)")
    ytr, _, classes = metrics._encode_labels(y_train, list(tests[0][1]))
    index = {c: i for i, c in enumerate(classes)}
    with metrics._torch_threads(threads):
        X = torch.as_tensor(X_train, dtype=torch.float32)
        y = torch.from_numpy(ytr)
        N, S, d = X.shape
        logits_w = torch.zeros(S, requires_grad=True)
        W = torch.zeros(len(classes), d, requires_grad=True)
        b = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.LBFGS([logits_w, W, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

        def standardised(Xs: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
            a = logits_w.softmax(0)
            z, zr = torch.einsum("s,nsd->nd", a, Xs), torch.einsum("s,nsd->nd", a, ref)
            return (z - zr.mean(0)) / zr.std(0).clamp_min(1e-6)

        seen: dict[int, list[float]] = {}

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(standardised(X, X) @ W.T + b, y) + W.pow(2).sum() / (2 * C * N)
            loss.backward()
            # the weights at the last evaluation of each iteration (L-BFGS counts them in its state)
            seen[opt.state[logits_w].get("n_iter", 0)] = logits_w.detach().softmax(0).tolist()
            return loss

        opt.step(closure)  # one call: L-BFGS's curvature memory spans all `steps` iterations
        seen[max(seen)] = logits_w.detach().softmax(0).tolist()
        history = sorted(seen.items())
        results = []
        with torch.no_grad():
            for X_test, y_test in tests:
                yte = np.array([index[c] for c in y_test])
                zt = standardised(torch.as_tensor(X_test, dtype=torch.float32), X) if len(yte) else None
                pred = (zt @ W.T + b).argmax(-1).numpy() if len(yte) else np.array([], dtype=int)
                results.append(metrics._result(pred, yte, len(ytr), len(classes)))
        w = logits_w.detach().softmax(0).numpy()
    return WeightedProbe(results[0], results, w, history)


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
        for name, split in EVAL_SPLITS.items():
            if a in IDENTITY and name == "heldout_voice":
                continue
            rows = cache.select(split=split)
            keep = [r for r, y in zip(rows, _label(cache, rows, a)) if y in seen_labels]
            out.scores[(a, "n_test", name)] = len(keep)
            out.scores[(a, "dropped", name)] = len(rows) - len(keep)
            if keep:
                plans[a][name] = keep

    def record(a: str, kind: str, name: str, res: metrics.ProbeResult) -> None:
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
                results = metrics.linear_probe_sets(pooled[train, index], ytr, tests, seed=seed)
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
            results = metrics.attention_probe_sets([feats[pos[r]] for r in train], _label(cache, train, a), tests,
                                                   seed=seed, steps=attn_steps)
            for name, res in zip(plan, results):
                record(a, "attention", name, res)
            out.seconds["attention"].append(time.perf_counter() - t1)
    return out


# ---------------------------------------------------------------------------------------------
# content: projector-only alignment at a fixed budget (omni.align)


class PrefixTracker:
    """Forwards to a tracker, prefixing every metric and figure name (`content.wer`, ...)."""

    def __init__(self, tracker, prefix: str):
        self.tracker, self.prefix = tracker, prefix

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.tracker.log_metrics({self.prefix + k: v for k, v in metrics.items()}, step=step)

    def log_figure(self, fig, name: str) -> None:
        self.tracker.log_figure(fig, self.prefix + name)

    def __getattr__(self, name: str):
        return getattr(self.tracker, name)


def audio_tokens_per_second(cache: FeatureCache, rows: Sequence[int], k: int) -> float:
    """Audio soft tokens per second of speech: ceil(frames / k) per clip over the clips' seconds."""
    fps = cache.index.get("frames_per_second", 50.0)
    frames = [cache.rows[r]["frames"] for r in rows]
    return sum(math.ceil(f / k) for f in frames) / (sum(frames) / fps) if frames else float("nan")


def run_content(cache: FeatureCache, tracker=None, test_clips: int = 100, seen_clips: int = 100, **align):
    """omni.align.run_alignment on `cache` with its metrics logged as `content.*`.

    `align` holds AlignConfig fields (layer, k, projector, steps, batch_size, lr, seed, lm, ...);
    Whisper's own decoder is never run here (whisper_baseline=False: the grid must not run
    Whisper). The held-out splits are capped at `test_clips` / `seen_clips` clips (decoding them
    is most of an alignment run's evaluation cost on a CPU)."""
    import dataclasses

    from omni.align import AlignConfig, run_alignment
    from omni.track import NullTracker

    names = {f.name for f in dataclasses.fields(AlignConfig)}
    unknown = sorted(set(align) - names)
    if unknown:
        raise ValueError(f"not AlignConfig fields: {unknown}")
    cfg = AlignConfig(**(align | {"whisper_baseline": False, "out": ""}))
    view = subset(cache, {"test": test_clips, "test_seen_voice": seen_clips})
    tracker = tracker or NullTracker()
    res = run_alignment(cfg, PrefixTracker(tracker, "content."), cache=view)
    extra = {"audio_tokens_per_s": audio_tokens_per_second(view, view.select(split="test"), cfg.k)}
    tracker.log_metrics({f"content.{k}": v for k, v in extra.items()}, step=cfg.steps)
    tracker.flush()
    res.scores.update(extra)
    return res


def alias_source(run_id: str, layer: str, n_states: int) -> str | None:
    """For "last" / "middle": a FINISHED sibling run (same parent) that read the same state by its
    index with the same parameters otherwise (seed included), or None. Its results are this
    point's results (the computation is deterministic given the state, the seed and the settings)."""
    if layer not in ("last", "middle") or not run_id:
        return None
    from omni import track

    mlc = track.client()
    run = mlc.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent:
        return None
    index = str(choice_index(layer, n_states))
    mine = {k: v for k, v in run.data.params.items() if k != "layer"}
    for _, r in child_runs(parent).iterrows():
        if r.get("params.layer") == index and r["status"] == "FINISHED" and r.run_id != run_id:
            theirs = {k[len("params."):]: v for k, v in r.items() if k.startswith("params.") and k != "params.layer" and isinstance(v, str)}
            if all(theirs.get(k) == v for k, v in mine.items()) and all(mine.get(k) == v for k, v in theirs.items()):
                return r.run_id
    return None


def copy_run_metrics(source: str, tracker, skip: Sequence[str] = ("time.", "data.")) -> dict[str, float]:
    """Every metric of run `source` (but those starting with `skip`: a run's own cost and data
    facts) with its whole history, steps kept, into `tracker`'s run; tags it omni.alias_of."""
    from omni import track

    mlc = track.client()
    latest = {k: v for k, v in mlc.get_run(source).data.metrics.items() if not k.startswith(tuple(skip))}
    for key in latest:
        for m in mlc.get_metric_history(source, key):
            tracker.log_metrics({key: m.value}, step=m.step)
    tracker.set_tags({"omni.alias_of": source})
    tracker.flush()
    return latest


# ---------------------------------------------------------------------------------------------
# the comparison: children of a grid's parent run, from MLflow


def child_runs(parent_run_id: str):
    """One row per child run of `parent_run_id` (mlflow.search_runs: metrics.*, params.*, tags.*)."""
    import mlflow

    from omni import track

    mlc = track.client()
    exp = mlc.get_run(parent_run_id).info.experiment_id
    return mlflow.search_runs(experiment_ids=[exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=50000, output_format="pandas")


def grid_axes(parent_run_id: str) -> dict[str, list]:
    """The grid of a parent run (the runner logs it as the JSON param `grid`), in YAML order."""
    from omni import track

    params = track.client().get_run(parent_run_id).data.params
    return json.loads(params.get("grid", "{}"))


def comparison(runs, by: Sequence[str], order: dict[str, list] | None = None):
    """Mean and std over the runs (seeds) of each group of `by` params, every metric.

    Returns a DataFrame indexed by the `by` values (in `order`'s order where given) with, for each
    metric M, columns M (mean) and M.std (sample std; NaN for one run), plus n_runs and run_ids.
    Only FINISHED runs count."""
    import pandas as pd

    runs = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    mcols = [c for c in runs.columns if c.startswith("metrics.")]
    keys = [f"params.{b}" for b in by]
    missing = [k for k in keys if k not in runs.columns]
    if missing:
        raise ValueError(f"runs have no params {missing}")
    g = runs.groupby(keys, sort=False)
    mean = g[mcols].mean().rename(columns=lambda c: c[len("metrics."):])
    std = g[mcols].std().rename(columns=lambda c: c[len("metrics."):] + ".std")
    table = pd.concat([mean, std], axis=1)
    table = table[[c for m in mean.columns for c in (m, m + ".std")]]
    table["n_runs"] = g.size()
    table["run_ids"] = g["run_id"].agg(lambda ids: " ".join(sorted(ids)))
    table.index.names = list(by)
    if order:
        pos = lambda col, v: order[col].index(v) if col in order and v in order[col] else len(order.get(col, []))  # noqa: E731
        idx = list(table.index)
        keyf = (lambda v: (pos(by[0], v), str(v))) if len(by) == 1 else (lambda v: tuple((pos(b, x), str(x)) for b, x in zip(by, v)))
        table = table.loc[sorted(idx, key=keyf)]
    return table


def _layer_order(grid: dict[str, list], n_states: int | None) -> dict[str, list]:
    order = {k: [str(v) for v in vs] for k, vs in grid.items()}
    if "layer" in order and n_states:
        known = layer_choices(n_states)
        order["layer"] = sorted(order["layer"], key=lambda v: known.index(v) if v in known else len(known))
    return order


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
                extra = "".join(f", {w} {_get(table, w, col):.3f}" for w in WEIGHTED
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
    for w in WEIGHTED:
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


# ---------------------------------------------------------------------------------------------
# plots (each returns a Figure)


def plot_probes(table, n_states: int, attributes: Sequence[str] = tuple(ATTRIBUTES)):
    """Accuracy per layer choice, one panel per attribute: both probes, both splits, chance dashed."""
    import matplotlib.pyplot as plt

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
            ax.errorbar(x, y, yerr=err, marker="o" if split == "seen_voice" else "s", lw=1.5, ms=4, capsize=2,
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


def plot_metrics(table, columns: Sequence[str], title: str, xlabel: str = "layer choice"):
    """One panel per metric column, mean ± std per group."""
    import matplotlib.pyplot as plt

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


def plot_weight_histories(histories: dict[str, list[tuple[int, list[float]]]], title: str):
    """One panel per objective: each state's softmax weight against the training step."""
    import matplotlib.pyplot as plt

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


def plot_weights(weights: dict[str, np.ndarray], title: str):
    """Final layer weights of several objectives side by side (grouped bars per state)."""
    import matplotlib.pyplot as plt

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


def weight_history(run_id: str, prefix: str, n_states: int) -> list[tuple[int, list[float]]]:
    """[(step, [w_0..w_S-1])] from a run's metric history of `prefix<i>` (e.g. content.layer_weight.)."""
    from omni import track

    per = [dict(track.metric_history(run_id, f"{prefix}{i}")) for i in range(n_states)]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per and all(per) else []
    return [(s, [p[s] for p in per]) for s in steps]
