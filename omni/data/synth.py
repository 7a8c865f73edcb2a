"""The synthesized multi-voice texture corpus: real English sentences spoken by espeak-ng in many
accents, voice variants, rates and pitches, each clip labelled for probes, plus its datasheet.

How a clip's split is decided (the plan is a pure function of the config; nothing is random at
render time):
1. Sentences. `sentences` are drawn (seeded) from `omni.data.text.sentences(min_words,
   max_words)`, shuffled (seeded), and cut into exactly round(test_fraction * n) test sentences,
   round(val_fraction * n) validation sentences (at least one each) and the rest train.
2. Voices. A voice (= speaker) is ACCENT+VARIANT, e.g. "en-gb-scotland+m3". Every voice whose
   variant is in `heldout_variants` is held out; by default f4 (female), m4 (male) and whisperf
   (female whisper), so held-out voices cover both genders and a style (whisper) whose other
   variant (male whisper) is seen. All accents appear among both seen and held-out voices.
3. Clips. Each train or val sentence is spoken by `clips_per_sentence` distinct seen voices
   (split "train" / "val"). Each test sentence is spoken twice: by a held-out voice (split
   "test": new sentence and new voice) and by a seen voice (split "test_seen_voice": new
   sentence, known voice). So no test or val sentence is ever in train, no held-out voice is ever
   in train, and "test" vs "test_seen_voice" have the same sentences, which separates sentence
   from voice generalisation. Voices are dealt round-robin from a seeded shuffle per split, so
   every voice gets about the same number of clips.
4. The hard set (only when `hard_clips` > 0): split "test_hard", test sentences spoken by held-out
   voices at rates and pitches OUTSIDE the configured ranges (`hard_rate`, `hard_pitch`: two
   intervals each, one below and one above), so both the voice and the way it is set were never
   heard in training. Its rate/pitch buckets are computed against the *training* ranges, so a
   rate below the range is "slow" and one above it "fast": the labels mean what they mean in
   training. `only=("test_hard",)` renders just these clips into their own folder, beside an
   existing corpus that stays as it is (same sentences, same splits: the plan is the same).
Which split a probe should be scored on:
- voice identity (speaker): fit on train, score on test_seen_voice (held-out sentences, voices it
  has seen; the held-out voices are classes it never saw).
- gender, accent, style, rate/pitch (value or bucket): fit on train, score on test_seen_voice and
  on test (unseen voices): the gap says how much the probe relies on the voice rather than the
  property.

Other design choices:
- rate, pitch and pitch_range are drawn per clip from a Random seeded by the clip's own key
  (seed, sentence, split, index), so a clip's labels never depend on the worker count or order.
- A wav's file name carries a hash of exactly what it was synthesized from (text, voice, rate,
  pitch, pitch_range), so a rerun skips a clip only if it would come out byte-identical, and a
  changed config can never reuse a stale file. Wavs are written to a temp name and renamed:
  an interrupted run leaves no half file and the next run resumes. Manifests are rebuilt from the
  plan each run (and only rewritten if they changed).
- Worker processes use the spawn start method (safe with torch and threads); espeak-ng runs as a
  fresh library instance per utterance (see omni.data.tts), so outputs are deterministic.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import html
import json
import multiprocessing as mp
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile as sf

from omni.common import atomic_save, file_lock, progress
from omni.data import audio, tts
from omni.data import text as text_source
from omni.data.manifest import read_manifest, write_manifest

SPLITS = ("train", "val", "test_seen_voice", "test")
HARD = "test_hard"  # the split of voices made differently from training (SynthConfig.hard_clips)
STYLES = {"klatt": "klatt", "klatt2": "klatt", "klatt3": "klatt", "klatt4": "klatt", "whisper": "whisper",
          "whisperf": "whisper", "croak": "croak", "grandma": "elderly", "grandpa": "elderly"}  # else "normal"


@dataclass
class SynthConfig:
    out: str = "data/synth"  # output folder: clips/*.wav, manifest.jsonl, one manifest per split
    sentences: int = 3000  # distinct sentences drawn from omni.data.text.sentences()
    seed: int = 0  # decides sentences, splits, voice assignment and per-clip rate/pitch
    min_words: int = 5
    max_words: int = 25
    text_sources: tuple[str, ...] = text_source.DEFAULT_SOURCES
    val_fraction: float = 0.05  # of the sentences
    test_fraction: float = 0.10  # of the sentences; each is spoken twice (test, test_seen_voice)
    clips_per_sentence: int = 1  # train/val renditions of a sentence, by distinct seen voices
    accents: tuple[str, ...] = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
                                "en-gb-x-gbclan", "en-gb-x-gbcwmd")  # espeak-ng English voices
    variants: tuple[str, ...] = ("f1", "f2", "f3", "f4", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7",
                                 "klatt", "klatt2", "whisper", "whisperf", "croak")  # espeak voices/!v
    heldout_variants: tuple[str, ...] = ("f4", "m4", "whisperf")  # never in train; both genders
    rate: tuple[int, int] = (130, 230)  # words per minute, uniform per clip (espeak default 175)
    pitch: tuple[int, int] = (25, 75)  # espeak base pitch 0-99 (50 = the variant's own), per clip
    pitch_range: tuple[int, int] = (30, 70)  # intonation excursion 0-99 (50 = default), per clip
    workers: int = 2  # synthesis processes (1: in this process)
    hard_clips: int = 0  # clips of split "test_hard": test sentences, held-out variants, rate and pitch outside the ranges above (0 = none)
    hard_rate: tuple[int, int, int, int] = (85, 120, 245, 300)  # test_hard rates: uniform on [a, b] or [c, d] (coin flip), outside `rate`
    hard_pitch: tuple[int, int, int, int] = (0, 15, 85, 99)  # test_hard pitches: [a, b] or [c, d], outside `pitch`
    only: tuple[str, ...] = ()  # write only these splits' clips (e.g. ("test_hard",): a separate hard corpus beside an existing one); () = all


@dataclass(frozen=True)
class Clip:
    clip_id: str  # the wav's stem: sentence id, voice, hash of the synthesis inputs
    sentence_id: int  # index into text.sentences(min_words, max_words, text_sources)
    text: str
    split: str
    accent: str
    variant: str
    gender: str  # female / male / other (the variant file's "gender" line; klatt has none)
    style: str  # normal / whisper / croak / klatt / elderly
    rate: int
    pitch: int
    pitch_range: int
    rate_bucket: str  # slow / medium / fast: thirds of the configured rate range
    pitch_bucket: str  # low / mid / high: thirds of the configured pitch range

    @property
    def voice(self) -> str:
        return f"{self.accent}+{self.variant}"

    @property
    def path(self) -> str:  # relative to the corpus folder
        return f"clips/{self.clip_id}.wav"

    def row(self, out: Path, duration: float) -> dict:
        return {"audio": out / self.path, "text": self.text, "voice": self.voice, "speaker": self.voice,
                "accent": self.accent, "variant": self.variant, "gender": self.gender, "style": self.style,
                "rate": self.rate, "rate_bucket": self.rate_bucket, "pitch": self.pitch,
                "pitch_bucket": self.pitch_bucket, "pitch_range": self.pitch_range,
                "duration": round(duration, 4), "split": self.split, "sentence_id": self.sentence_id,
                "clip_id": self.clip_id}


# --- the plan -----------------------------------------------------------------------------------


@functools.cache
def variant_gender(variant: str) -> str:
    """'female' / 'male' from the variant file's 'gender' line; 'other' when it has none."""
    import espeakng_loader

    f = Path(espeakng_loader.get_data_path()) / "voices" / "!v" / variant
    if not f.is_file():
        raise ValueError(f"unknown espeak-ng voice variant {variant!r} (no file {f})")
    for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "gender" and parts[1] in ("female", "male"):
            return parts[1]
    return "other"


def _bucket(value: int, lo: int, hi: int, names: tuple[str, str, str]) -> str:
    third = (hi - lo) / 3
    return names[0] if value < lo + third else names[1] if value < lo + 2 * third else names[2]


def _check(cfg: SynthConfig) -> None:
    for name in ("rate", "pitch", "pitch_range"):
        lo, hi = getattr(cfg, name)
        if not lo <= hi:
            raise ValueError(f"SynthConfig.{name} must be (low, high) with low <= high, got {(lo, hi)}")
    if not (0 < cfg.val_fraction and 0 < cfg.test_fraction and cfg.val_fraction + cfg.test_fraction < 1):
        raise ValueError(f"need 0 < val_fraction, 0 < test_fraction, sum < 1; got {cfg.val_fraction}, {cfg.test_fraction}")
    if cfg.sentences < 3:
        raise ValueError(f"sentences must be at least 3 (one per split), got {cfg.sentences}")
    unknown = sorted(set(cfg.accents) - set(tts.list_english_voices()))
    if unknown:
        raise ValueError(f"unknown accents {unknown}; English voices: {tts.list_english_voices()}")
    unknown = sorted(set(cfg.variants) - set(tts.list_variants()))
    if unknown:
        raise ValueError(f"unknown voice variants {unknown}; see omni.data.tts.list_variants()")
    if not set(cfg.heldout_variants) <= set(cfg.variants):
        raise ValueError(f"heldout_variants {cfg.heldout_variants} must be among variants {cfg.variants}")
    for group, vs in (("held-out", cfg.heldout_variants), ("seen", [v for v in cfg.variants if v not in cfg.heldout_variants])):
        genders = {variant_gender(v) for v in vs}
        if not {"female", "male"} <= genders:
            raise ValueError(f"{group} variants {list(vs)} must include a female and a male voice (have {sorted(genders)})")
    if cfg.hard_clips < 0:
        raise ValueError(f"SynthConfig.hard_clips must be >= 0, got {cfg.hard_clips}")
    for name, inner in (("hard_rate", cfg.rate), ("hard_pitch", cfg.pitch)):
        a, b, c, d = getattr(cfg, name)
        if not (a <= b < inner[0] and inner[1] < c <= d):
            raise ValueError(f"SynthConfig.{name}={getattr(cfg, name)} must be two intervals [a, b] below and [c, d] above "
                             f"the training range {inner} (a <= b < {inner[0]}, {inner[1]} < c <= d)")
    if cfg.hard_pitch[0] < 0 or cfg.hard_pitch[3] > 99:
        raise ValueError(f"SynthConfig.hard_pitch={cfg.hard_pitch}: espeak pitch is 0-99")
    unknown = sorted(set(cfg.only) - set(SPLITS) - {HARD})
    if unknown or (HARD in cfg.only and not cfg.hard_clips):
        raise ValueError(f"SynthConfig.only={cfg.only}: " + (f"unknown splits {unknown} (choose from {SPLITS + (HARD,)})" if unknown
                                                              else "test_hard needs hard_clips > 0"))
    if cfg.clips_per_sentence < 1 or cfg.clips_per_sentence > len(cfg.accents) * (len(cfg.variants) - len(cfg.heldout_variants)):
        raise ValueError(f"clips_per_sentence must be between 1 and the number of seen voices, got {cfg.clips_per_sentence}")


def sentence_splits(cfg: SynthConfig) -> dict[str, list[tuple[int, str]]]:
    """{"train"|"val"|"test": [(sentence_id, text), ...]}: step 1 of the module docstring."""
    pool = text_source.sentences(cfg.min_words, cfg.max_words, tuple(cfg.text_sources))
    if cfg.sentences > len(pool):
        raise ValueError(
            f"sentences={cfg.sentences} but only {len(pool)} sentences of {cfg.min_words}-{cfg.max_words} "
            f"words in text sources {tuple(cfg.text_sources)}"
        )
    rng = random.Random(f"{cfg.seed}:sentences")
    ids = rng.sample(range(len(pool)), cfg.sentences)  # already a seeded shuffle
    n_test = max(1, round(cfg.test_fraction * cfg.sentences))
    n_val = max(1, round(cfg.val_fraction * cfg.sentences))
    parts = {"test": ids[:n_test], "val": ids[n_test : n_test + n_val], "train": ids[n_test + n_val :]}
    return {k: [(i, pool[i]) for i in sorted(v)] for k, v in parts.items()}


def held_out_sentences(cfg: SynthConfig | None = None) -> set[str]:
    """Val and test sentences of the corpus `cfg` describes: pass as `exclude` to
    omni.data.text.lm_splits so an LM never trains on a held-out transcript."""
    parts = sentence_splits(cfg or SynthConfig())
    return {s for k in ("val", "test") for _, s in parts[k]}


def voices(cfg: SynthConfig) -> tuple[list[str], list[str]]:
    """(seen, held_out) voices as "ACCENT+VARIANT"."""
    seen = [f"{a}+{v}" for a in cfg.accents for v in cfg.variants if v not in cfg.heldout_variants]
    held = [f"{a}+{v}" for a in cfg.accents for v in cfg.variants if v in cfg.heldout_variants]
    return seen, held


def plan(cfg: SynthConfig) -> list[Clip]:
    """Every clip of the corpus with its labels; pure and cheap (no audio)."""
    _check(cfg)
    parts = sentence_splits(cfg)
    seen, held = voices(cfg)
    # (sentence, split, how many voices, from which pool): step 3 of the module docstring
    jobs = [("train", s, cfg.clips_per_sentence, seen) for s in parts["train"]]
    jobs += [("val", s, cfg.clips_per_sentence, seen) for s in parts["val"]]
    jobs += [("test_seen_voice", s, 1, seen) for s in parts["test"]]
    jobs += [("test", s, 1, held) for s in parts["test"]]
    # the hard set: test sentences in order, cycled if hard_clips is larger (each time by another voice)
    jobs += [(HARD, parts["test"][i % len(parts["test"])], 1, held) for i in range(cfg.hard_clips)]
    dealt: dict[str, list[str]] = {}
    counters: collections.Counter = collections.Counter()
    clips = []
    for split, (sid, sentence), k, pool in jobs:
        if split not in dealt:
            dealt[split] = random.Random(f"{cfg.seed}:voices:{split}").sample(pool, len(pool))
        order = dealt[split]
        for j in range(k):
            voice = order[counters[split] % len(order)]
            counters[split] += 1
            accent, variant = voice.split("+")
            if split == HARD:  # outside the training ranges: one of the two intervals, each by a coin flip
                r = random.Random(f"{cfg.seed}:clip:{sid}:{split}:{counters[split]}")
                rate = r.randint(*(cfg.hard_rate[:2] if r.random() < 0.5 else cfg.hard_rate[2:]))
                pitch = r.randint(*(cfg.hard_pitch[:2] if r.random() < 0.5 else cfg.hard_pitch[2:]))
                prange = r.randint(*cfg.pitch_range)
            else:
                r = random.Random(f"{cfg.seed}:clip:{sid}:{split}:{j}")
                rate, pitch, prange = r.randint(*cfg.rate), r.randint(*cfg.pitch), r.randint(*cfg.pitch_range)
            digest = hashlib.sha1(f"{sentence}|{voice}|{rate}|{pitch}|{prange}".encode()).hexdigest()[:8]
            clips.append(
                Clip(
                    clip_id=f"{sid:05d}_{accent}_{variant}_{digest}",
                    sentence_id=sid, text=sentence, split=split, accent=accent, variant=variant,
                    gender=variant_gender(variant), style=STYLES.get(variant, "normal"),
                    rate=rate, pitch=pitch, pitch_range=prange,
                    rate_bucket=_bucket(rate, *cfg.rate, ("slow", "medium", "fast")),
                    pitch_bucket=_bucket(pitch, *cfg.pitch, ("low", "mid", "high")),
                )
            )
    if cfg.only:
        clips = [c for c in clips if c.split in cfg.only]
    return clips


# --- rendering ----------------------------------------------------------------------------------


def _render(job: tuple[str, str, str, int, int, int]) -> tuple[str, int]:
    """Synthesize one clip and write it atomically; runs in a worker process."""
    path, sentence, voice, rate, pitch, prange = job
    wave = tts.synthesize(sentence, voice=voice, rate=rate, pitch=pitch, pitch_range=prange)
    atomic_save(path, lambda tmp: audio.save(tmp, wave))
    return path, int(wave.numel())


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; threads inside would fight over them


def prepare_corpus(cfg: SynthConfig) -> Path:
    """The corpus at cfg.out, built when it has no manifest yet (an existing corpus is used as it is,
    whatever config built it). Safe from parallel grid workers: the first holds a lock while it
    builds, the others wait and then find it in place."""
    out = Path(cfg.out)
    lock = out.parent / f".{out.name}.prepare.lock"
    with file_lock(lock):
        try:
            if not (out / "manifest.jsonl").is_file():
                build_corpus(cfg)
        finally:  # built or failed, no lock file stays behind (a waiter then locks afresh: common.file_lock)
            lock.unlink(missing_ok=True)
    return out


def build_corpus(cfg: SynthConfig) -> Path:
    """Render every clip of plan(cfg) that is not on disk yet, then (re)write the manifests and
    config.json; returns the corpus folder. Rerunning is cheap and resumes an interrupted build."""
    out = Path(cfg.out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    clips = plan(cfg)
    for stale in (out / "clips").glob("*.tmp"):  # left by an interrupted run
        stale.unlink()
    todo = [c for c in clips if not (out / c.path).is_file()]
    jobs = [(str(out / c.path), c.text, c.voice, c.rate, c.pitch, c.pitch_range) for c in todo]
    t0 = time.perf_counter()
    bar = progress(total=len(jobs), enabled=bool(jobs), desc=f"synth {out}", unit="clip", file=sys.stderr)
    if jobs and cfg.workers > 1:
        ctx = mp.get_context("spawn")
        with ctx.Pool(cfg.workers, initializer=_worker_init) as pool:
            for _ in pool.imap_unordered(_render, jobs, chunksize=8):
                bar.update()
    else:
        for job in jobs:
            _render(job)
            bar.update()
    bar.close()
    elapsed = time.perf_counter() - t0
    if jobs:  # on stdout: a line of the report, not a warning
        print(f"synth: rendered {len(jobs)} clips in {elapsed:.1f} s ({len(jobs) / elapsed:.1f} clips/s, "
              f"{cfg.workers} worker(s)); {len(clips) - len(jobs)} already present")
    planned = {c.clip_id for c in clips}
    orphans = [p for p in (out / "clips").glob("*.wav") if p.stem not in planned]
    if orphans:
        print(f"synth: {len(orphans)} wav(s) in {out / 'clips'} are not in this config's plan (left alone)", file=sys.stderr)

    rows = []
    for c in clips:
        info = sf.info(str(out / c.path))
        rows.append(c.row(out.resolve(), info.frames / info.samplerate))
    write_manifest(out / "manifest.jsonl", rows)
    for split in SPLITS + (HARD,):
        if any(r["split"] == split for r in rows):
            write_manifest(out / f"{split}.jsonl", [r for r in rows if r["split"] == split])
    meta = {"config": asdict(cfg), "counts": dict(collections.Counter(r["split"] for r in rows)),
            "seconds": round(sum(r["duration"] for r in rows), 2)}
    meta["config"].pop("workers")  # does not change the corpus
    meta["config"].pop("out")
    text = json.dumps(meta, indent=2) + "\n"
    cfg_path = out / "config.json"
    if not cfg_path.is_file() or cfg_path.read_text() != text:
        cfg_path.write_text(text)
    return out


# --- datasheet ----------------------------------------------------------------------------------


def datasheet(out_dir: str | Path, report_dir: str | Path = "reports") -> Path:
    """Write report_dir/synth_datasheet.html (+ a duration histogram PNG): counts per split and
    label, how splits are made, and example clips playable in the page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir, report_dir = Path(out_dir), Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    m = read_manifest(out_dir / "manifest.jsonl", check_audio=False)
    rows = [dict(e.labels, text=e.text, audio=e.audio) for e in m]
    meta_path = out_dir / "config.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    splits = [s for s in SPLITS if any(r["split"] == s for r in rows)]

    png = report_dir / "synth_durations.png"
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist([[r["duration"] for r in rows if r["split"] == s] for s in splits], bins=30, stacked=True, label=splits)
    ax.set_xlabel("clip duration (s)")
    ax.set_ylabel("clips")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)

    def table(header: list[str], body: list[list]) -> str:
        th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><tr>{th}</tr>{trs}</table>"

    per_split = []
    for s in splits:
        rs = [r for r in rows if r["split"] == s]
        per_split.append([s, len(rs), len({r["sentence_id"] for r in rs}), len({r["speaker"] for r in rs}),
                          f"{sum(r['duration'] for r in rs) / 60:.1f}", f"{sum(r['duration'] for r in rs) / len(rs):.2f}"])
    total_s = sum(r["duration"] for r in rows)
    per_split.append(["all", len(rows), len({r["sentence_id"] for r in rows}), len({r["speaker"] for r in rows}),
                      f"{total_s / 60:.1f}", f"{total_s / max(1, len(rows)):.2f}"])
    label_tables = []
    for label in ("gender", "style", "accent", "rate_bucket", "pitch_bucket", "variant"):
        values = sorted({str(r[label]) for r in rows})
        body = [[v] + [sum(1 for r in rows if r["split"] == s and str(r[label]) == v) for s in splits] for v in values]
        label_tables.append(f"<h3>{label}</h3>" + table([label, *splits], body))

    # examples: the first clip of each (split, style) pair, so every style and split can be heard
    examples, seen_keys = [], set()
    for r in rows:
        key = (r["split"], r["style"])
        if key not in seen_keys:
            seen_keys.add(key)
            examples.append(r)
    ex_html = []
    for r in examples[:16]:
        src = Path(os.path.relpath(Path(r["audio"]).resolve(), report_dir.resolve())).as_posix()
        labels = ", ".join(f"{k}={r[k]}" for k in ("split", "speaker", "gender", "style", "rate", "pitch", "duration"))
        ex_html.append(f"<li><audio controls preload='none' src='{html.escape(src)}'></audio> "
                       f"<b>{html.escape(r['text'])}</b><br><small>{html.escape(labels)}</small></li>")

    doc = (__doc__ or "").split("Other design choices:")[0]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Synthesized speech corpus: datasheet</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}pre{{white-space:pre-wrap;background:#f6f6f6;padding:1em}}
li{{margin:.6em 0}}</style></head><body>
<h1>Synthesized speech corpus: datasheet</h1>
<p>Corpus folder: <code>{html.escape(str(out_dir))}</code>. {len(rows)} clips, {total_s / 3600:.2f} hours,
{len({r['sentence_id'] for r in rows})} sentences, {len({r['speaker'] for r in rows})} voices.
Speech: espeak-ng (PyPI <code>espeakng-loader</code>), 16 kHz mono 16-bit PCM. Text: public-domain English
(see <code>omni/data/LICENSES.md</code>). Generated by <code>omni.data.synth</code>.</p>
<h2>Counts per split</h2>
{table(["split", "clips", "sentences", "voices", "minutes", "mean s"], per_split)}
<h2>Durations</h2><img src="{png.name}" alt="duration histogram">
<h2>Counts per label and split</h2>{''.join(label_tables)}
<h2>Example clips</h2><ul>{''.join(ex_html)}</ul>
<h2>How the corpus is made</h2><pre>{html.escape(doc)}</pre>
<h2>Configuration</h2><pre>{html.escape(json.dumps(meta.get('config', {}), indent=1))}</pre>
</body></html>
"""
    path = report_dir / "synth_datasheet.html"
    path.write_text(page, encoding="utf-8")
    return path
