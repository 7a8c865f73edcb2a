"""The instruct experiment (notebook 07): instruction tuning on texture, then the
texture benchmark on two test sets.

`benchmark` asks an instruction-tuned model (omni.experiments.tuning) the benchmark's questions, beside
the baselines on the very same questions (omni.eval.texture: train majority, transcript only, shuffled
audio, the linear probe), and scores transcription through the chat format. `run` is notebook 07's
one call: instruction data and the hard test set when missing, instruction tuning while watching
held-out voices, both test sets benchmarked. `benchmark_run` is `omni texture`: the benchmark of a
run trained earlier.

Design choices:
- Listening is watched while training: at every evaluation, `watch_clips` clips of the held-out
  voices (split test) are asked all their texture questions with their own audio and with shuffled
  audio; per-task balanced accuracy of both goes to MLflow (watch_<task>, watch_shuffled_<task>)
  and the report. Those clips' questions are left out of the benchmark, and nothing is selected by
  them (the model scored is the last step's).
- The benchmark samples `bench_per_task` questions per task, stratified by answer (omni.eval.texture).
- The hard set (split `test_hard`, omni.data.synth) lives in a corpus and feature cache of its own;
  the probes still fit on the training corpus's cache and read the hard clips from theirs.
- Transcription through chat is scored with the alignment yardstick's normalisation and clear-speech
  split, so it compares with the alignment recipe's WER.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from omni.common import atomic_write
from omni.data.features import FeatureCache, build_features
from omni.data.instructions import TEXTURE_TASKS, InstructionConfig, load_corpus_rows, write_instructions
from omni.data.manifest import read_manifest
from omni.data.synth import HARD, SynthConfig, build_corpus, prepare_corpus
from omni.eval import metrics, texture, texture_baselines
from omni.eval.yardstick import whisper_hyps
from omni.experiments import plots
from omni.experiments.audio_run import load_run, require_lm, run_cache, run_meta
from omni.experiments.ladder import Ladder, run_ladder, silence_states
from omni.experiments.tuning import TuningConfig, TuningResult, Watch, answerer, tune
from omni.model.speech_lm import SpeechLM
from omni.params import require, require_choice
from omni.track import NullTracker, Tracker

TRANSCRIPTS = ("reference", "whisper")  # what the transcript-only baseline reads: the corpus text, or Whisper's transcripts


@dataclass
class BenchmarkResult:
    results: dict  # {answerer name: {task: omni.eval.texture.TaskScore}}
    transcribe: dict[str, float]  # WER of the chat transcripts: wer, median_wer, clear_wer, clear_median_wer, n, n_clear
    n_questions: int
    formats: list[dict] = field(default_factory=list)  # the model per texture task and question format (omni.eval.texture.by_format)


def instruction_rows(path: str | Path) -> list[dict]:
    """The label dicts (task, format, options, answer, ...) of an instruction manifest: what the
    train-majority baseline counts."""
    return [e.labels for e in read_manifest(path, check_audio=False)] if Path(path).is_file() else []


def benchmark(model: SpeechLM, cache: FeatureCache, questions: list[dict], clips: FeatureCache | None = None,
              transcripts: str = "reference", encoder: str = "tiny.en", seed: int = 0, train_rows: list[dict] | None = None) -> BenchmarkResult:
    """The model and the baselines on `questions`; the probes fit on `cache`'s train split, the
    questions' clips come from `clips` (default `cache`; another cache for a separate test corpus);
    train_rows: the training instructions' rows, for the train-majority baseline (none: left out).

    transcripts: what the transcript-only probe reads for the questions' clips: "reference" (the
    corpus text: a perfect transcriber, the strictest text-only baseline) or "whisper" (Whisper's
    own greedy transcripts; slow on CPU)."""
    require_choice("transcripts", transcripts, TRANSCRIPTS)
    clips = clips or cache
    row_of = {r["labels"].get("clip_id"): i for i, r in enumerate(clips.rows)}
    ids = sorted({c for q in questions for c in q["clip_ids"]})
    missing = [c for c in ids if c not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} question clip(s) not in the feature cache {clips.path}, e.g. {missing[0]}")
    if transcripts == "whisper":
        text = dict(zip(ids, whisper_hyps(clips, [row_of[c] for c in ids], encoder)))
    else:
        text = {c: clips.rows[row_of[c]]["text"] for c in ids}
    corpus_rows = [dict(r["labels"], text=r["text"]) for r in cache.rows]
    ask = answerer(model, clips)
    frames = {r["labels"].get("clip_id"): r["frames"] for r in clips.rows}
    size = lambda q: sum(frames[c] for c in q["clip_ids"]) + len(q["question"]) / 2  # batches of like length: little padding
    predictions = texture.ask(questions, ask, length=size)
    results = {texture.MODEL: texture.score(questions, predictions, seed=seed)}
    if train_rows:
        results[texture.MAJORITY] = texture.run_benchmark(questions, texture_baselines.majority_answerer(train_rows), seed=seed)
    heard = [q for q in questions if q["task"] in TEXTURE_TASKS]  # shuffled audio only where it is a control: texture
    results |= {
        f"{texture.TEXT} ({transcripts})": texture.run_benchmark(questions, texture_baselines.text_probe_answerer(corpus_rows, questions, text, seed), seed=seed),
        texture.SHUFFLED: texture.run_benchmark(texture_baselines.shuffled_questions(heard, seed), ask, seed=seed, length=size),
        texture.PROBE: texture.run_benchmark(questions, texture_baselines.probe_answerer(cache, questions, seed=seed, clips=clips), seed=seed),
    }
    return BenchmarkResult(results, transcription_wer(questions, predictions, clips), len(questions), texture.by_format(questions, predictions))


def watcher(cache: FeatureCache, questions: list[dict], seed: int = 0) -> Watch:
    """What `run` watches at every evaluation: per texture task, the balanced accuracy on `questions`
    (clips of held-out voices) with their own audio (watch_<task>) and with shuffled audio
    (watch_shuffled_<task>), and the means over tasks (watch_texture, watch_shuffled_texture)."""
    shuffled = texture_baselines.shuffled_questions(questions, seed)
    frames = {r["labels"].get("clip_id"): r["frames"] for r in cache.rows}
    size = lambda q: sum(frames[c] for c in q["clip_ids"])

    def watch(model: SpeechLM, step: int) -> dict[str, float]:
        ask = answerer(model, cache)
        out = {}
        for name, qs in (("watch", questions), ("watch_shuffled", shuffled)):
            s = texture.score(qs, texture.ask(qs, ask, length=size), seed=seed, n_boot=1)  # no CI wanted here: one resample
            tasks = [t for t in TEXTURE_TASKS if t in s]
            out |= {f"{name}_{t}": s[t].balanced for t in tasks}
            out[f"{name}_texture"] = float(np.mean([s[t].balanced for t in tasks])) if tasks else float("nan")
        return out

    return watch


def watch_questions(path: str | Path, n_clips: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """(the texture questions of `n_clips` seeded clips of a test manifest, those clip ids); never more
    than a quarter of its clips, so the benchmark keeps most of them."""
    with warnings.catch_warnings():  # the whole test set, of which a few clips are kept: its size is not the point here
        warnings.simplefilter("ignore")
        rows = texture.load_questions(path, check_audio=False) if n_clips else []
    clips = sorted({q["clip_ids"][0] for q in rows if q["task"] in TEXTURE_TASKS})
    chosen = sorted(random.Random(f"{seed}:watch").sample(clips, min(n_clips, len(clips) // 4)))
    keep = set(chosen)
    return [q for q in rows if q["task"] in TEXTURE_TASKS and keep.issuperset(q["clip_ids"][:1])], chosen


def transcription_wer(questions: list[dict], predictions: list, cache: FeatureCache) -> dict[str, float]:
    """WER of the answers to the transcription questions (chat transcripts), on all of them and on
    clear speech (style "normal", as omni.eval.yardstick), corpus and median; {} without such questions."""
    idx = [i for i, q in enumerate(questions) if q["task"] == "transcribe"]
    if not idx:
        return {}
    style = {r["labels"].get("clip_id"): r["labels"].get("style", "normal") for r in cache.rows}
    refs, hyps = [questions[i]["answer"] for i in idx], [predictions[i] or "" for i in idx]
    clear = [j for j, i in enumerate(idx) if style.get(questions[i]["clip_ids"][0], "normal") == "normal"]
    out = {"n": float(len(idx)), "wer": metrics.wer(refs, hyps), "median_wer": metrics.median_wer(refs, hyps), "n_clear": float(len(clear))}
    if clear:
        c_refs, c_hyps = [refs[j] for j in clear], [hyps[j] for j in clear]
        out |= {"clear_wer": metrics.wer(c_refs, c_hyps), "clear_median_wer": metrics.median_wer(c_refs, c_hyps)}
    return out


def save_benchmark(res: BenchmarkResult, out: str | Path, title: str = ""):
    """OUT/scores.json and OUT/bench.png; returns the figure."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "scores.json", json.dumps({"scores": {k: {t: asdict(v) for t, v in r.items()} for k, r in res.results.items()},
                                                  "transcribe": res.transcribe, "n_questions": res.n_questions, "formats": res.formats}, indent=1))
    fig = plots.texture_scores(res.results, title=title or f"texture benchmark: {res.n_questions} questions")
    fig.savefig(out / "bench.png", dpi=110)
    return fig


def load_tuned(run: str | Path, device: str = "cpu") -> tuple[SpeechLM, dict]:
    """(model, meta) of an instruction-tuned run (`--run`); any other run is refused before its weights are read."""
    _, meta = run_meta(run, "--run")
    if meta.get("recipe") != "tuning":
        raise FileNotFoundError(f"--run {run}: not an instruction-tuned run (its audio_path.json was not written by omni.experiments.tuning)")
    return load_run(run, device, "--run")


def benchmark_run(run: str | Path, out: str | Path, questions: str | Path = "", transcripts: str = "reference",
                  device: str = "cpu", bench_per_task: int = 0, seed: int = 0, features: str | Path = "") -> dict:
    """The benchmark on an instruction-tuned run: the model, and on the same questions train majority,
    transcript only (a probe on the transcript), shuffled audio and the linear-probe ceiling. Writes
    OUT/scores.json and OUT/bench.png; returns {answerer: {task: TaskScore}}.

    features: the feature cache holding the questions' clips when it is not the run's own (a
    separate test corpus such as test_hard); the probes still fit on the run's cache.
    bench_per_task: questions per task (a seeded sample stratified by answer); 0 = all.
    """
    require_choice("transcripts", transcripts, TRANSCRIPTS)
    model, meta = load_tuned(run, device)
    cache = run_cache(meta)
    clips = FeatureCache.open(features) if features else cache
    qs = texture.load_questions(questions or Path(meta["instructions"]) / "test.jsonl", check_audio=False,
                                max_per_task=bench_per_task or None, seed=seed)
    res = benchmark(model, cache, qs, clips, transcripts, meta.get("encoder", "tiny.en"), seed,
                    instruction_rows(Path(meta["instructions"]) / "train.jsonl"))
    fig = save_benchmark(res, out, title=f"texture benchmark: {len(qs)} questions, {Path(run).name}")
    plt.close(fig)
    return res.results


def listening_ladder(model: SpeechLM, cache: FeatureCache, instructions: str | Path, watched_clips: list[str], encoder: str,
                     per_task: int, seed: int = 0) -> Ladder:
    """The ladder (omni.experiments.ladder) of a tuned model on its instruction set: probes fitted on
    train.jsonl's questions, scored on test.jsonl's less the clips watched while it trained."""
    folder = Path(instructions)
    return run_ladder(model, cache, texture.load_questions(folder / "train.jsonl", check_audio=False),
                      texture.load_questions(folder / "test.jsonl", check_audio=False, exclude_clips=watched_clips),
                      silence=silence_states(encoder), per_task=per_task, seed=seed)


def ladder_run(run: str | Path, out: str | Path, per_task: int = 150, seed: int = 0, device: str = "cpu") -> Ladder:
    """The listening ladder of an instruction-tuned run, as its own run measured it at the end (the
    same held-out clips: the test questions less those it watched); writes OUT/ladder.json (the table
    and where each task's voice is lost) and OUT/ladder.png."""
    model, meta = load_tuned(run, device)
    cfg = meta.get("config", {})
    _, watched = watch_questions(Path(meta["instructions"]) / "test.jsonl", int(cfg.get("watch_clips", 0)), int(cfg.get("seed", seed)))
    lad = listening_ladder(model, run_cache(meta), meta["instructions"], watched, meta.get("encoder", "tiny.en"), per_task, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "ladder.json", json.dumps({"table": lad.table(), "where_lost": lad.where_lost()}, indent=1))
    fig = plots.ladder(lad.table())
    fig.savefig(out / "ladder.png", dpi=110)
    plt.close(fig)
    return lad


# --- the experiment: data, training, the benchmark on two test sets -----------------------------


@dataclass
class InstructConfig(TuningConfig):
    hard_corpus: str = "data/synth_hard"  # the hard test corpus (split test_hard), rendered from `corpus`'s config if missing
    hard_clips: int = 300  # clips of the hard corpus when it is built; 0 = no hard set
    hard_features: str = "cache/features"  # feature cache root for the hard corpus
    bench_per_task: int = 150  # questions per task in each benchmark (a seeded sample, stratified by answer); 0 = all
    watch_clips: int = 24  # held-out clips (split test) whose texture questions are asked at every evaluation, with their own and shuffled audio; left out of the benchmark; 0 = none
    transcripts: str = "reference"  # what the transcript-only probe reads: reference (a perfect transcriber) | whisper
    ladder_per_task: int = 150  # questions per task (train and test each) of the listening ladder on the final model; 0 = no ladder

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("hard_clips", "bench_per_task", "watch_clips", "ladder_per_task"):
            require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        require_choice("transcripts", self.transcripts, TRANSCRIPTS)


@dataclass
class InstructResult:
    config: InstructConfig
    tuning: TuningResult
    benches: dict[str, BenchmarkResult]  # "test" (held-out voices), "test_hard" (voices made differently)
    metrics: dict[str, float]
    ladder: Ladder | None = None  # where the voice is lost, on the final model (None: ladder_per_task=0)


def corpus_config(corpus: str | Path, **changes) -> SynthConfig:
    """The SynthConfig a corpus was built with (its config.json; older key names read too), with `changes`."""
    f = Path(corpus) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no corpus config (build the corpus with `omni data synth --out {corpus}`)")
    raw = json.loads(f.read_text())["config"]
    if "n_sentences" in raw:  # the field's earlier name
        raw["sentences"] = raw.pop("n_sentences")
    names = {f.name for f in fields(SynthConfig)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
    return SynthConfig(**(kw | changes))


def prepare_hard(cfg: InstructConfig, progress: bool = False) -> FeatureCache | None:
    """The hard test set: its corpus (test sentences of `corpus`, held-out variants, rate/pitch outside
    the training ranges; omni.data.synth), its questions (instructions/test_hard.jsonl, the options of
    `corpus`) and its features, each built when missing. None when hard_clips is 0."""
    if not cfg.hard_clips:
        return None
    hard = Path(cfg.hard_corpus)
    if not (hard / "manifest.jsonl").is_file():
        build_corpus(corpus_config(cfg.corpus, out=str(hard), hard_clips=cfg.hard_clips, only=(HARD,), workers=2))
    # never a sentence the model trained on: every hard sentence must be one of the corpus's test sentences
    test_texts = {r["text"] for r in load_corpus_rows(cfg.corpus) if r["split"] == "test"}
    stray = [r["text"] for r in load_corpus_rows(hard) if r["text"] not in test_texts]
    if stray:
        raise ValueError(f"{hard}: {len(stray)} clip(s) speak a sentence that is not in {cfg.corpus}'s test split, e.g. {stray[0]!r} "
                         f"(built from another corpus config? parameter `hard_corpus`)")
    if not (Path(cfg.instructions) / f"{HARD}.jsonl").is_file():
        write_instructions(InstructionConfig(corpus=str(hard), out=cfg.instructions, options_from=cfg.corpus))
    return FeatureCache.open(build_features(hard / "manifest.jsonl", cfg.hard_features, cfg.encoder, progress=progress))


def prepare_data(cfg: InstructConfig) -> FeatureCache:
    """The corpus (the default one, as `omni data synth` builds it, when missing), its instruction
    manifests (built from it when missing) and its feature cache: `features` is a cache folder
    (index.json) or a root to build it under."""
    prepare_corpus(SynthConfig(out=cfg.corpus, seed=0))
    if not (Path(cfg.instructions) / "train.jsonl").is_file():
        write_instructions(InstructionConfig(corpus=cfg.corpus, out=cfg.instructions))
    f = Path(cfg.features or "cache/features")
    if (f / "index.json").is_file():
        return FeatureCache.open(f)
    return FeatureCache.open(build_features(Path(cfg.corpus) / "manifest.jsonl", f, cfg.encoder, progress=False))


def run(cfg: InstructConfig, tracker: Tracker | NullTracker | None = None) -> InstructResult:
    """Data (built when missing) -> tune, watching held-out voices -> the benchmark on the held-out test
    set and on the hard set, with the baselines; headline metrics (test_*, hard_*) logged to `tracker`."""
    tracker = tracker or NullTracker()
    if not cfg.run:
        require_lm(cfg.lm)  # before minutes of data: a missing LM is said now
    cache = prepare_data(cfg)
    hard = prepare_hard(cfg)
    folder = Path(cfg.instructions)
    watched, watched_clips = watch_questions(folder / "test.jsonl", cfg.watch_clips, cfg.seed)
    watch = watcher(cache, watched, cfg.seed) if watched else None  # held-out voices, right and shuffled audio, every evaluation
    res = tune(replace(cfg, features=str(cache.path)), cache=cache, tracker=tracker, watch=watch)
    per = cfg.bench_per_task or None
    train_rows = instruction_rows(folder / "train.jsonl")
    sets = {"test": (folder / "test.jsonl", cache, watched_clips, None)}
    if hard is not None:  # beside the held-out set: its texture, and transcription's WER
        sets["test_hard"] = (folder / "test_hard.jsonl", hard, [], TEXTURE_TASKS + ("transcribe",))
    benches, m = {}, {"val_loss": res.val_loss, "train_seconds": res.history.seconds, "watched_clips": float(len(watched_clips))}
    for name, (path, clips, skip, tasks) in sets.items():
        t0 = time.perf_counter()
        qs = texture.load_questions(path, check_audio=False, max_per_task=per, seed=cfg.seed, exclude_clips=skip, tasks=tasks)
        b = benchmark(res.model, cache, qs, clips, cfg.transcripts, cfg.encoder, cfg.seed, train_rows)
        benches[name] = b
        prefix = "" if name == "test" else "hard_"
        m |= texture.headline(b.results, prefix) | {f"{prefix}bench_seconds": time.perf_counter() - t0, f"{prefix}n_questions": float(len(qs))}
        m |= {f"{prefix}transcribe_{k}": v for k, v in b.transcribe.items()}
        m[f"{prefix}meets_bar"] = float(texture.meets_bar(b.results)[0])
        for fmt in ("open", "mc"):  # the texture mean per question format: hearing the value vs binding it to a letter
            got = [r["balanced"] for r in b.formats if r["format"] == fmt and r["task"] in texture.REQUIRED_TASKS]
            if got:
                m[f"{prefix}texture_{fmt}_mean"] = float(np.mean(got))
    ladder = None
    if cfg.ladder_per_task:
        t0 = time.perf_counter()
        ladder = listening_ladder(res.model, cache, folder, watched_clips, cfg.encoder, cfg.ladder_per_task, cfg.seed)
        m |= ladder.metrics() | {"ladder_seconds": time.perf_counter() - t0}
    tracker.log_metrics(m, step=cfg.steps)
    tracker.flush()
    return InstructResult(cfg, res, benches, m, ladder)
