"""Seeing the alignment: audio soft tokens and the LM's token embeddings in one picture.

For one or more alignment runs (omni.experiments.audio_run), the audio tokens of held-out clips are computed twice:
with the projector at its initialisation (omni.experiments.audio_run.initial_model: the run's seed and config,
untrained) and with the run's trained audio path. Both sit beside the LM's token embeddings
(`GPT.embed`: normed, exactly what the transformer sees) in a shared 2-D map, in statistics
(omni.eval.embedding_stats) and in a nearest-token readout (omni.experiments.embedding_page). `run` is the
notebook's (06) one call; its figures are in omni.experiments.plots.

Design choices:
- Word timing (which word each audio token hears), omni.data.tts: `espeak` for clips of the
  synthesized corpus (omni.data.synth): the sentence is synthesized again with the clip's voice,
  rate and pitch, and espeak-ng's own word events give each word's onset (sample-exact: the
  re-synthesis is checked to have the clip's length, else the clip falls back). `chars` for any
  corpus: the clip's duration split between its words by length. Against espeak's times on 200
  held-out synthesized clips: 74% of audio tokens get the same word, onsets off by 71 ms on
  average (trimming silence by energy did not help: espeak's first word starts at 0 s). The
  notebook re-measures it on the clips it shows (`validate_timing`). Each audio token gets the word
  under its centre time; tokens outside every word get -1 (silence).
- Maps: PCA (exact, deterministic) and UMAP, each fitted once per run on the union of a text-token
  sample and the audio tokens before and after training, so all three share coordinates. UMAP with
  `random_state` is deterministic but runs single-threaded (umap-learn disables its parallelism when
  a seed is given). `umap` is imported inside `project` only: its import costs >10 s (numba).
- Statistics are computed on every token of the sampled clips; only the map is subsampled.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omni.data.tts import chars_word_times, split_words, token_words, word_timing_agreement, word_times
from omni.eval.embedding_stats import Clip, alignment_stats, readout, token_strings, token_table, word_token_ids
from omni.experiments.audio_run import initial_model, load_run, run_cache, run_dirs
from omni.model.encoder import collate_states
from omni.track import NullTracker, Tracker


@dataclass
class EmbeddingVizConfig:
    run: str = ""  # alignment run(s): folder, report folder, grid report folder or MLflow run id; comma-separated
    split: str = "test"  # held-out split(s) of the feature cache, comma-separated; "" = every clip
    clips: int = 200  # held-out clips (sampled with `seed`) whose audio tokens are analysed
    text_points: int = 1000  # LM token embeddings on the map: the clips' transcript tokens first
    audio_points: int = 1000  # audio tokens on the map per stage (before / after), same tokens in both
    umap: bool = True  # also a UMAP map (PCA is always made)
    n_neighbors: int = 15  # UMAP
    min_dist: float = 0.1  # UMAP
    candidates: int = 100  # retrieval among this many clips (blocks of the sample; 1/candidates is chance)
    topk: int = 5  # nearest LM tokens per audio token in the readout
    word_timing: str = "auto"  # auto (espeak where the clip is synthesized, else chars) | espeak | chars
    validate_clips: int = 100  # clips on which `chars` timing is scored against espeak's own word times
    readout_clips: int = 3  # clips shown in the nearest-token readout (the report only)
    seed: int = 0  # fixes the clip sample, the map sample, the controls and UMAP
    device: str = "cpu"  # where the models run: cpu | cuda | auto
    batch_size: int = 32  # clips per forward pass of the audio path


STAGES = ("before", "after")
LABELS = ("voice", "gender", "accent", "variant", "style", "rate", "pitch", "rate_bucket", "pitch_bucket", "split")


def pick_clips(cache, split: str, n: int, seed: int) -> list[int]:
    """Up to n cache rows of the split(s), a seeded sample in seeded order (deterministic)."""
    splits = [s.strip() for s in split.split(",") if s.strip()]
    rows = [i for i, r in enumerate(cache.rows) if not splits or r["labels"].get("split") in splits]
    if not rows:
        raise ValueError(f"{cache.path}: no clips in split {split!r}")
    g = np.random.default_rng(seed)
    return [rows[i] for i in g.permutation(len(rows))[:n]]


@torch.no_grad()
def audio_tokens(model, cache, rows: list[int], batch_size: int = 32) -> list[np.ndarray]:
    """Per clip (A_i, n_embd) float32 audio tokens of `rows`, in order."""
    out = []
    device = model.gpt_device
    for i in range(0, len(rows), batch_size):
        states = cache.load_states(rows[i : i + batch_size])
        hidden, lengths = collate_states([s.float() for s in states])
        tokens, n = model.audio_tokens(hidden.to(device), lengths.to(device))
        out += [t[:m].float().cpu().numpy() for t, m in zip(tokens, n.tolist())]
    return out


def _is_synth(labels: dict) -> bool:
    return all(k in labels for k in ("voice", "rate", "pitch", "pitch_range"))


def clip_timing(row: dict, seconds: float, method: str = "auto") -> tuple[list[tuple[float, float]], str]:
    """Word spans of one cache row and the method that made them (see the module docstring)."""
    labels = row["labels"]
    if method not in ("auto", "espeak", "chars"):
        raise ValueError(f"word_timing={method!r}: choose auto, espeak or chars")
    if method != "chars" and _is_synth(labels):
        spans, total = word_times(row["text"], labels["voice"], int(labels["rate"]), int(labels["pitch"]), int(labels["pitch_range"]))
        if "duration" in labels and abs(total - float(labels["duration"])) < 1e-3:
            return spans, "espeak"
    if method == "espeak":
        raise ValueError(f"clip {row['audio']}: espeak timing needs a clip synthesized by omni.data.synth (voice, rate, "
                         "pitch, pitch_range and a matching duration)")
    return chars_word_times(row["text"], 0.0, seconds), "chars"


def make_clips(cache, rows: list[int], n_tokens: list[int], seconds_per_token: float, tokenizer, method: str = "auto") -> list[Clip]:
    fps = cache.index.get("frames_per_second", 50.0)
    out = []
    for r, n in zip(rows, n_tokens):
        row = cache.rows[r]
        seconds = float(row["labels"].get("duration") or row["frames"] / fps)
        spans, how = clip_timing(row, seconds, method)
        words = [w for w, _, _ in split_words(row["text"])]
        out.append(Clip(r, row["text"], dict(row["labels"]), words, spans, how, token_words(spans, n, seconds_per_token),
                        tokenizer.encode(row["text"]), word_token_ids(tokenizer, words)))
    return out


def validate_timing(cache, rows: list[int], seconds_per_token: float) -> dict[str, float]:
    """`chars` timing scored against espeak's word times on synthesized clips (mean over clips)."""
    fps = cache.index.get("frames_per_second", 50.0)
    scores = []
    for r in rows:
        row = cache.rows[r]
        if not _is_synth(row["labels"]):
            continue
        seconds = float(row["labels"].get("duration") or row["frames"] / fps)
        ref, how = clip_timing(row, seconds, "auto")
        if how != "espeak":
            continue
        n = math.ceil(seconds / seconds_per_token)
        scores.append(word_timing_agreement(chars_word_times(row["text"], 0.0, seconds), ref, n, seconds_per_token))
    if not scores:
        return {"clips": 0}
    return {"clips": len(scores)} | {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


KIND_NAMES = ("text", "before", "after")


@dataclass
class MapData:
    kind: np.ndarray  # (N,) 0 = LM token, 1 = audio token before training, 2 = after
    clip: np.ndarray  # (N,) clip index of an audio token, -1 for LM tokens
    pos: np.ndarray  # (N,) position in its clip of an audio token; the token id of an LM token
    xy: dict[str, np.ndarray] = field(default_factory=dict)  # projection name -> (N, 2)


def map_sample(tokens: dict[str, list[np.ndarray]], clips: list[Clip], vocab_size: int, text_points: int, audio_points: int, seed: int = 0) -> tuple[np.ndarray, MapData, np.ndarray]:
    """Which points go on the map: (text ids, MapData without coordinates, audio (clip, pos) pairs).

    LM tokens: every one if the vocabulary fits in `text_points`, else the clips' transcript tokens
    (most frequent first, up to half the budget) and a seeded sample of the rest. Audio tokens: a
    seeded sample of `audio_points` (clip, position) pairs, the same pairs for every stage."""
    g = np.random.default_rng(seed)
    if vocab_size <= text_points:
        text_ids = np.arange(vocab_size)
    else:
        counts: dict[int, int] = {}
        for c in clips:
            for i in c.text_ids:
                counts[i] = counts.get(i, 0) + 1
        first = sorted(counts, key=lambda i: (-counts[i], i))[: text_points // 2]
        rest = np.setdiff1d(np.arange(vocab_size), first)
        text_ids = np.sort(np.concatenate([first, g.choice(rest, size=min(len(rest), text_points - len(first)), replace=False)]).astype(np.int64))
    ref = next(iter(tokens.values()))
    pairs = np.array([(i, j) for i, t in enumerate(ref) for j in range(len(t))], dtype=np.int64).reshape(-1, 2)
    if len(pairs) > audio_points:
        pairs = pairs[np.sort(g.choice(len(pairs), size=audio_points, replace=False))]
    kind = [np.zeros(len(text_ids), dtype=np.int64)] + [np.full(len(pairs), KIND_NAMES.index(s)) for s in tokens]
    clip = [np.full(len(text_ids), -1)] + [pairs[:, 0] for _ in tokens]
    pos = [text_ids] + [pairs[:, 1] for _ in tokens]
    return text_ids, MapData(np.concatenate(kind), np.concatenate(clip), np.concatenate(pos)), pairs


def map_points(table: np.ndarray, tokens: dict[str, list[np.ndarray]], text_ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The (N, D) vectors in MapData order: LM tokens, then each stage's sampled audio tokens."""
    parts = [table[text_ids]] + [np.stack([tokens[s][i][j] for i, j in pairs]) if len(pairs) else np.zeros((0, table.shape[1])) for s in tokens]
    return np.concatenate(parts).astype(np.float32)


def project(X: np.ndarray, method: str = "pca", seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """(N, D) -> (N, 2). PCA: exact SVD (sign fixed by sklearn's svd_flip). UMAP: seeded, which
    makes umap-learn run single-threaded; n_neighbors is capped at N - 1 for small maps."""
    X = np.asarray(X, dtype=np.float32)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, svd_solver="full").fit_transform(X).astype(np.float32)
    if method == "umap":
        import warnings

        import umap  # >10 s cold (numba): only here

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_jobs value.*")  # the seed's single thread is intended
            warnings.filterwarnings("ignore", message=".*Graph is not fully connected.*")
            reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(n_neighbors, len(X) - 1)), min_dist=min_dist,
                                random_state=seed, init="spectral" if len(X) > 50 else "random")
            return reducer.fit_transform(X).astype(np.float32)
    raise ValueError(f"projection {method!r}: choose pca or umap")


@dataclass
class RunViz:
    name: str  # e.g. "layer=last k=4 stack"
    path: Path  # the run's model folder
    meta: dict  # its audio_path.json
    clips: list[Clip]
    tokens: dict[str, list[np.ndarray]]  # stage -> per clip (A_i, D)
    stats: dict[str, dict[str, float]]  # stage -> alignment_stats
    nn: dict[str, list[tuple[np.ndarray, np.ndarray]]]  # stage -> per clip readout (ids, sims)
    strings: list[str]  # token id -> readable string
    map: MapData
    timing_check: dict[str, float]  # `chars` timing vs espeak on synthesized clips
    seconds_per_token: float


def _run_names(metas: list[dict], paths: list[Path]) -> list[str]:
    names = []
    for m in metas:
        s = m["speech_lm"]
        names.append(f"layer={s['layer']} k={s['k']} {s['projector']}")
    for i, n in enumerate(names):
        if names.count(n) > 1:
            names[i] = f"{n} ({paths[i].parent.name or paths[i].name})"
    return names


def run(cfg: EmbeddingVizConfig, tracker: Tracker | NullTracker | None = None, log=print) -> list[RunViz]:
    """Notebook 06's one call: everything the report shows, for every run in cfg.run (see
    EmbeddingVizConfig); the statistics go to `tracker` (flat_metrics)."""
    paths = run_dirs(cfg.run)
    metas = [json.loads((p / "audio_path.json").read_text()) for p in paths]
    names = _run_names(metas, paths)
    out = []
    checked: dict[str, dict] = {}
    for path, name in zip(paths, names):
        after, meta = load_run(path, cfg.device)
        before = initial_model(after, meta)
        cache = run_cache(meta)
        rows = pick_clips(cache, cfg.split, cfg.clips, cfg.seed)
        fps = cache.index.get("frames_per_second", 50.0)
        spt = after.projector.config.k / fps
        tokens = {"before": audio_tokens(before, cache, rows, cfg.batch_size), "after": audio_tokens(after, cache, rows, cfg.batch_size)}
        clips = make_clips(cache, rows, [len(t) for t in tokens["after"]], spt, after.tokenizer, cfg.word_timing)
        table = token_table(after.gpt)
        strings = token_strings(after.tokenizer, len(table))
        stats = {s: alignment_stats(tokens[s], clips, table, cfg.topk, cfg.candidates, cfg.seed) for s in STAGES}
        nn = {s: [readout(t, table, cfg.topk) for t in tokens[s]] for s in STAGES}
        key = f"{cache.path}|{spt}"
        if key not in checked:
            checked[key] = validate_timing(cache, rows[: cfg.validate_clips], spt) if cfg.validate_clips else {"clips": 0}
        text_ids, m, pairs = map_sample(tokens, clips, len(table), cfg.text_points, cfg.audio_points, cfg.seed)
        X = map_points(table, tokens, text_ids, pairs)
        for method in ("pca", "umap") if cfg.umap else ("pca",):
            log(f"{name}: {method} of {len(X)} points")
            m.xy[method] = project(X, method, cfg.seed, cfg.n_neighbors, cfg.min_dist)
        out.append(RunViz(name, path, meta, clips, tokens, stats, nn, strings, m, checked[key], spt))
    tracker = tracker or NullTracker()
    tracker.log_metrics(flat_metrics(out))
    tracker.flush()
    return out


def stats_table(runs: list[RunViz]):
    """pandas DataFrame: one row per statistic, one column per (run, stage)."""
    import pandas as pd

    cols = {(r.name, s): r.stats[s] for r in runs for s in STAGES}
    df = pd.DataFrame(cols)
    df.columns = pd.MultiIndex.from_tuples(df.columns, names=["run", "stage"])
    return df


def slug(name: str) -> str:
    """A run name as a file / metric name: "layer=last k=4 stack" -> "layer_last_k_4_stack"."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def flat_metrics(runs: list[RunViz]) -> dict[str, float]:
    """MLflow metrics: `{stage}_{stat}` for the first run, `{run}/{stage}_{stat}` for every run."""
    out = {}
    for i, r in enumerate(runs):
        tag = slug(r.name)
        for s in STAGES:
            for k, v in r.stats[s].items():
                k = k.replace("@", "_at_")
                if i == 0:
                    out[f"{s}_{k}"] = v
                out[f"{tag}/{s}_{k}"] = v
    return {k: float(v) for k, v in out.items() if v == v}  # MLflow rejects nothing, but NaN helps no one


def norm_word(w: str) -> str:
    return re.sub(r"[^\w']", "", w.lower())


def point_label(rv: RunViz, label: str) -> list:
    """One value per map point (None for LM tokens): a clip label, or "word" (the word under the
    audio token, "" in silence), or "position" (seconds into the clip)."""
    out: list = []
    for kind, c, p in zip(rv.map.kind, rv.map.clip, rv.map.pos):
        if kind == 0:
            out.append(None)
            continue
        clip = rv.clips[c]
        if label == "word":
            w = int(clip.token_word[p]) if p < len(clip.token_word) else -1
            out.append(norm_word(clip.words[w]) if w >= 0 else "")
        elif label == "position":
            out.append(round((p + 0.5) * rv.seconds_per_token, 3))
        else:
            out.append(clip.labels.get(label, ""))
    return out
