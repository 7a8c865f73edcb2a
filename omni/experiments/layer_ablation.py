"""One point of a layer or projector ablation grid: texture probes and content alignment, from the cache.

A grid point is one layer choice (a state index, "last", "middle", "weighted", "weighted_ln") and one
audio path (k, projector, encoder_mode), measured two ways, both from the feature cache (Whisper
never runs in a grid point):
- texture: omni.eval.layer_probes (voice, gender, accent, rate, pitch, style; seen and unseen voices);
- content: projector-only alignment into the frozen LM (omni.experiments.alignment) at a fixed budget.
The summary notebook rebuilds the comparison from MLflow (omni.eval.compare), so every number in the
report is a child run's metric. `run` is the grid-point notebook's (04) one call.

Design choices:
- The config IS an AlignConfig (same field names: steps, eval_clips, k, projector, ...) plus the
  probe settings; its defaults are the ablation's small budget. steps = 0 skips the content arm.
- The corpus and cache are built by omni.experiments.alignment.prepare_cache under a file lock: parallel grid
  workers wait for the first one instead of encoding twice.
- "last" and "middle" reuse a finished sibling run of the same state (omni.eval.compare.alias_source).
- Only the first `probe_seeds` seeds run probes: the linear probes are deterministic.

Metric names (one MLflow run per grid point): probe.* (omni.eval.layer_probes);
    content.<name>   omni.experiments.alignment's metrics with the prefix (wer, cer, test_loss, control_wer, tokens_per_s,
                     step_seconds, loss by step, layer_weight.<i> by step, ...) + content.audio_tokens_per_s
    time.<what>      seconds: prepare, probes, content, total per point
    data.n_states, data.n_clips, data.cache_built_here
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import ClassVar
from dataclasses import dataclass
from typing import Sequence

import torch

from omni.data.features import FeatureCache
from omni.eval import compare
from omni.eval.layer_probes import ATTRIBUTES, PROBES, LayerProbes, choice_index, run_probes
from omni.experiments import alignment
from omni.experiments.alignment import AlignConfig, AlignResult, prepare_cache
from omni.model.encoder import LayerSelect
from omni.track import NullTracker


@dataclass
class AblationConfig(AlignConfig):
    # the alignment's fields, with the ablation's small budget as defaults
    steps: int = 150  # alignment steps of the content arm, 0 for no content measurement
    MIN_STEPS: ClassVar[int] = 0  # 0 skips the content arm
    batch_size: int = 16  # clips per alignment step
    warmup: int = 20  # linear lr warmup steps
    eval_every: int = 0  # alignment evaluations every this many steps, 0 for only at the end
    eval_clips: int = 8  # clips decoded per intermediate evaluation: only the curves use them
    max_new_tokens: int = 60  # decoding budget per clip, in LM tokens
    device: str = "cpu"  # cpu | cuda | auto
    whisper_baseline: bool = False  # a grid point never runs Whisper
    # the ablation's own
    weights_every: int = 20  # eval_every for weighted choices: each evaluation records the content layer weights
    test_clips: int = 100  # held-out clips (split test, unseen voices) decoded at the end of the content arm
    seen_clips: int = 0  # ... and of split test_seen_voice
    probes: str = "linear,attention"  # texture probes to run, comma-separated; "" for none
    probe_seeds: int = 1  # probes run for seeds below this (the linear probes are deterministic)
    attributes: str = "voice,gender,accent,rate,pitch,style"  # what the probes predict (omni.eval.layer_probes.ATTRIBUTES)
    attn_stride: int = 4  # the attention probe reads frames averaged in runs of this many (4: 12.5 per second)
    attn_steps: int = 200  # Adam steps of the attention probe
    weighted_steps: int = 100  # L-BFGS iterations of the joint texture probe: layer weights and classifier
    threads: int = 1  # torch threads: 1 is fastest on a shared 2-core box

    def align_config(self) -> AlignConfig:
        """The content arm's AlignConfig: this config's alignment fields, no Whisper, no checkpoint."""
        names = {f.name for f in dataclasses.fields(AlignConfig)}
        cfg = AlignConfig(**{n: getattr(self, n) for n in names})
        every = self.weights_every if str(self.layer) in LayerSelect.WEIGHTED else self.eval_every
        return dataclasses.replace(cfg, layer=str(self.layer), eval_every=every, whisper_baseline=False, out="")


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



def run_content(cache: FeatureCache, cfg: AlignConfig, tracker=None, test_clips: int = 100, seen_clips: int = 100) -> AlignResult:
    """omni.experiments.alignment.run on `cache` with its metrics logged as `content.*`. The held-out
    splits are capped at `test_clips` / `seen_clips` clips (decoding them is most of an alignment
    run's evaluation cost on a CPU)."""
    view = subset(cache, {"test": test_clips, "test_seen_voice": seen_clips})
    tracker = tracker or NullTracker()
    res = alignment.run(cfg, PrefixTracker(tracker, "content."), cache=view)
    extra = {"audio_tokens_per_s": audio_tokens_per_second(view, view.select(split="test"), cfg.k)}
    tracker.log_metrics({f"content.{k}": v for k, v in extra.items()}, step=cfg.steps)
    tracker.flush()
    res.scores.update(extra)
    return res


@dataclass
class PointResult:
    config: AblationConfig
    cache: FeatureCache
    cache_built: bool  # this run built the cache (else it was read)
    alias_of: str | None  # the sibling run whose metrics were copied ("last"/"middle"), else None
    probes: LayerProbes | None
    content: AlignResult | None
    seconds: dict[str, float]  # prepare, probes, content, total


def _names(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def run(cfg: AblationConfig, tracker=None, run_id: str = "", log=print) -> PointResult:
    """One grid point end to end: cache, alias check, probes, content; everything logged to `tracker`
    (`run_id`: the point's MLflow run, for the alias check among its siblings)."""
    tracker = tracker or NullTracker()
    unknown = sorted(set(_names(cfg.probes)) - set(PROBES)) + sorted(set(_names(cfg.attributes)) - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"unknown probes/attributes {unknown} (parameters `probes`, `attributes`); "
                         f"probes: {list(PROBES)}, attributes: {list(ATTRIBUTES)}")
    align = cfg.align_config()
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    t0 = time.time()  # the cache's index.json is written only when the cache is built
    cache = prepare_cache(align, progress=False)
    built = (cache.path / "index.json").stat().st_mtime >= t0
    seconds = {"prepare": time.perf_counter() - t_start}
    tracker.log_metrics({"time.prepare": seconds["prepare"], "data.cache_built_here": float(built),
                         "data.n_states": cache.n_states, "data.n_clips": len(cache)})
    log(f"cache {cache.path}: {len(cache)} clips, {cache.n_states} states x {cache.d_model}, "
        f"{'BUILT in this run' if built else 'read from cache'}")

    alias = compare.alias_source(run_id, align.layer, cache.n_states)
    if alias:
        copied = compare.copy_run_metrics(alias, tracker)
        log(f"{align.layer} = state {choice_index(align.layer, cache.n_states)}: {len(copied)} metrics copied from run {alias}")
    probes = None
    kinds = _names(cfg.probes) if cfg.seed < cfg.probe_seeds and not alias else []
    if kinds:
        t0 = time.perf_counter()
        probes = run_probes(cache, align.layer, _names(cfg.attributes), seed=cfg.seed, probes=kinds, attn_stride=cfg.attn_stride,
                            attn_steps=cfg.attn_steps, weighted_steps=cfg.weighted_steps, log=log)
        probes.log(tracker)
        seconds["probes"] = time.perf_counter() - t0
        tracker.log_metrics({"time.probes": seconds["probes"]})
    content = None
    if cfg.steps > 0 and not alias:
        t0 = time.perf_counter()
        content = run_content(cache, align, tracker, test_clips=cfg.test_clips, seen_clips=cfg.seen_clips)
        seconds["content"] = time.perf_counter() - t0
        tracker.log_metrics({"time.content": seconds["content"]})
    seconds["total"] = time.perf_counter() - t_start
    tracker.log_metrics({"time.total": seconds["total"]})
    tracker.flush()
    return PointResult(cfg, cache, built, alias, probes, content, seconds)


def weight_histories(res: PointResult) -> dict[str, list[tuple[int, list[float]]]]:
    """Layer weights vs training step by objective, for a weighted choice whose content arm ran: content,
    then each texture one ({} otherwise)."""
    if res.content is None or not res.content.layer_weights_history or str(res.config.layer) not in LayerSelect.WEIGHTED:
        return {}
    hist = {"content objective (alignment)": [(st, w) for (st, _), w in zip(res.content.wer_curve, res.content.layer_weights_history)]}
    if res.probes is not None:
        hist |= {f"texture: {a}": h for a, h in res.probes.history.items()}
    return hist
