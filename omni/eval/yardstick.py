"""The yardstick: held-out transcripts scored the same way for every system, Whisper beside ours.

Design choices:
- Whisper's own transcripts are cached in the feature cache folder (they depend on nothing trained
  here), one file per encoder and decoding settings, keyed by the clip's audio path, saved per batch.
  Decoding the 300 held-out clips under the guard takes ~13 minutes on 2 CPU cores, so the repo also
  ships them (`baselines/`, keyed by the SHA-1 of each clip's bytes): a fresh machine whose corpus
  synthesis gave the same audio takes them from there, and every run compares against the same figure.
- Every system is decoded under the same loop guard (speech_lm.LoopGuard, openai-whisper's
  temperature fallback), because a few runaway loops otherwise decide a corpus WER; the median
  per-clip WER is reported beside the corpus WER.
- Clear speech (style "normal") is scored apart from the whispered/creaky/klatt/elderly styles, and
  every breakdown (split, style, variant, rate, pitch) holds every system on the same clips.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from omni.common import atomic_write
from omni.data import audio
from omni.data.features import FeatureCache
from omni.eval import metrics
from omni.model.encoder import load_whisper_model, whisper_transcribe
from omni.model.speech_lm import LoopGuard


def decoding_key(guard: LoopGuard | None) -> str:
    """A file-name tag for decoding settings: "greedy", or the guard's settings in short."""
    if guard is None:
        return "greedy"
    digest = hashlib.sha1(json.dumps(asdict(guard), sort_keys=True).encode()).hexdigest()[:8]
    return f"guard-{digest}"


def whisper_decode(model, processor, waves: list[torch.Tensor], guard: LoopGuard | None = None, batch_size: int = 8) -> list[str]:
    """Whisper's own transcripts of `waves`: greedy, or under `guard`'s settings with transformers'
    temperature fallback (whose sampling draws from torch's global generator: seeded here with
    guard.seed per batch, so a batch decodes the same way every run)."""
    if guard is None:
        return whisper_transcribe(model, processor, waves, batch_size=batch_size)
    out = []
    for i in range(0, len(waves), batch_size):
        torch.manual_seed(guard.seed)
        out += whisper_transcribe(model, processor, waves[i : i + batch_size], batch_size=batch_size, temperature=guard.temperatures,
                                  compression_ratio_threshold=guard.compression_ratio_threshold, logprob_threshold=guard.logprob_threshold)
    return out


BASELINES = Path(__file__).parent / "baselines"  # Whisper's transcripts of the default corpus, shipped


def audio_sha1(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def hyps_name(encoder: str, guard: LoopGuard | None) -> str:
    """The file name of Whisper's transcripts for an encoder and decoding settings (cached and shipped)."""
    return f"whisper_hyps.{encoder.replace('/', '_')}.{decoding_key(guard)}.json"


def shipped_hyps(encoder: str, guard: LoopGuard | None) -> dict[str, str]:
    """{SHA-1 of a clip's bytes: Whisper's transcript} shipped for these settings ({} if none)."""
    f = BASELINES / hyps_name(encoder, guard)
    return json.loads(f.read_text()) if f.exists() else {}


def whisper_hyps(cache: FeatureCache, rows: list[int], encoder: str, guard: LoopGuard | None = None, batch_size: int = 8) -> list[str]:
    """`whisper_decode` of `rows`, cached in the feature cache folder, one file per encoder and
    decoding settings, keyed by the clip's audio path (not its row number: a view of the cache,
    e.g. omni.experiments.layer_ablation.subset, numbers its rows differently but shares the folder).
    A clip whose bytes match one of the shipped transcripts (shipped_hyps) is not decoded again."""
    f = cache.path / hyps_name(encoder, guard)
    have = json.loads(f.read_text()) if f.exists() else {}
    todo = [r for r in rows if cache.rows[r]["audio"] not in have]
    shipped = shipped_hyps(encoder, guard) if todo else {}
    if shipped:
        for r in todo:
            h = shipped.get(audio_sha1(cache.rows[r]["audio"]))
            if h is not None:
                have[cache.rows[r]["audio"]] = h
        todo = [r for r in todo if cache.rows[r]["audio"] not in have]
        atomic_write(f, json.dumps(have))
    if todo:
        model, processor = load_whisper_model(encoder)
        for i in range(0, len(todo), batch_size):  # saved per batch: a long decode resumes where it stopped
            chunk = todo[i : i + batch_size]
            waves = [audio.load(cache.rows[r]["audio"]) for r in chunk]
            for r, h in zip(chunk, whisper_decode(model, processor, waves, guard, batch_size)):
                have[cache.rows[r]["audio"]] = h
            atomic_write(f, json.dumps(have))  # a reader never sees half a file
    return [have[cache.rows[r]["audio"]] for r in rows]


def ship_hyps(cache: FeatureCache, rows: list[int], encoder: str, guard: LoopGuard | None = None) -> Path:
    """Write Whisper's transcripts of `rows` (whisper_hyps) into BASELINES, keyed by each clip's SHA-1,
    beside any already shipped for these settings; the file's path."""
    f = BASELINES / hyps_name(encoder, guard)
    shipped = shipped_hyps(encoder, guard)
    hyps = whisper_hyps(cache, rows, encoder, guard)
    shipped |= {audio_sha1(cache.rows[r]["audio"]): h for r, h in zip(rows, hyps)}
    BASELINES.mkdir(exist_ok=True)
    atomic_write(f, json.dumps(shipped, indent=0, sort_keys=True) + "\n")
    return f


SCORE_BY = ("split", "style", "variant", "rate_bucket", "pitch_bucket")  # row labels the report breaks WER down by


def score_table(refs: list[str], systems: dict[str, list[str]], labels: list[dict], by: tuple[str, ...] = SCORE_BY) -> list[dict]:
    """Every system's WER (corpus and median per clip) and CER on the same clips, in total
    (by="all") and per value of each label in `by` that every clip's labels carry: a list of
    {"by", "group", "system", "n", "wer", "median_wer", "cer"} rows."""
    out = []
    for label in ("all",) + tuple(b for b in by if all(b in r for r in labels)):
        keys = ["all" if label == "all" else str(r[label]) for r in labels]
        for name, hyps in systems.items():
            for group, sc in metrics.grouped_wer(refs, hyps, keys).items():
                out.append({"by": label, "group": group, "system": name} | sc)
    return out


def clear_rows(labels: list[dict]) -> list[int]:
    """Indices of the clear-speech clips: style "normal" (not whispered, creaky, klatt or elderly;
    a clip without a style label counts as clear)."""
    return [i for i, r in enumerate(labels) if r.get("style", "normal") == "normal"]


def content_scores(refs: list[str], systems: dict[str, list[str]], labels: list[dict]) -> dict[str, float]:
    """Flat headline scores: for each system NAME ("" for ours), NAMEwer / NAMEmedian_wer / NAMEcer
    on all clips and clear_NAMEwer / clear_NAMEmedian_wer / clear_NAMEcer on the clear-speech clips."""
    clear = clear_rows(labels)
    out: dict[str, float] = {"n_clear": float(len(clear))}
    for name, hyps in systems.items():
        p = f"{name}_" if name else ""
        out |= {f"{p}wer": metrics.wer(refs, hyps), f"{p}median_wer": metrics.median_wer(refs, hyps), f"{p}cer": metrics.cer(refs, hyps)}
        if clear:
            c_refs, c_hyps = [refs[i] for i in clear], [hyps[i] for i in clear]
            out |= {f"clear_{p}wer": metrics.wer(c_refs, c_hyps), f"clear_{p}median_wer": metrics.median_wer(c_refs, c_hyps),
                    f"clear_{p}cer": metrics.cer(c_refs, c_hyps)}
    return out
