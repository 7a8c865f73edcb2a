"""Seeing the alignment: audio soft tokens and the LM's token embeddings in one picture.

For one or more alignment runs (omni.align), the audio tokens of held-out clips are computed twice:
with the projector at its initialisation (the SpeechLM rebuilt with the run's seed and config,
untrained) and with the run's trained audio path. Both sit beside the LM's token embeddings
(`GPT.embed`: normed, exactly what the transformer sees) in a shared 2-D map, in statistics and in a
nearest-token readout.

Design choices:
- "Before" is the run's own initialisation: `run_alignment` seeds torch with `cfg.seed` right before
  building the SpeechLM, and the LM is loaded before that, so the same seed and config rebuild the
  same initial weights.
- Word timing (which word each audio token hears). Two methods:
  `espeak`: for clips of the synthesized corpus (omni.data.synth) the sentence is synthesized again
  with the clip's voice, rate and pitch, and espeak-ng's own word events give each word's onset
  (sample-exact: the re-synthesis is checked to have the clip's length, else the clip falls back).
  `chars`: any corpus: the clip's duration is split between its words in proportion to their
  letters and digits, +1 per word, +3 after punctuation (a pause). Against espeak's times on 200
  held-out synthesized clips: 74% of audio tokens get the same word, onsets off by 71 ms on average
  (trimming leading/trailing silence by energy did not help: espeak's first word starts at 0 s).
  The notebook re-measures it on the clips it shows (`validate_timing`).
  Each audio token gets the word under its centre time; tokens outside every word get -1 (silence).
- A word's embedding is the mean of its tokens' embeddings, tokenized as in the transcript (a
  leading space for every word but the first), so the concatenated word tokens are the transcript's.
- Maps: PCA (exact, deterministic) and UMAP, each fitted once per run on the union of a text-token
  sample and the audio tokens before and after training, so all three share coordinates. UMAP with
  `random_state` is deterministic but runs single-threaded (umap-learn disables its parallelism when
  a seed is given). `umap` is imported inside `project` only: its import costs >10 s (numba).
- The interactive page is one self-contained HTML file (inline JSON, a <canvas>, ~150 lines of JS):
  no CDN, no plotly, viewable offline.
- Statistics are computed on every token of the sampled clips; only the map is subsampled.
"""

from __future__ import annotations

import ctypes
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omni import metrics
from omni.tokenizer import ByteTokenizer

# ---------------------------------------------------------------------------------------------
# Word timing


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Whitespace words with their character spans: [(word, start, end)]."""
    return [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def _letters(word: str) -> int:
    return max(1, sum(c.isalnum() for c in word))


PAUSE_PUNCT = ",;:.!?"


def chars_word_times(text: str, start: float, end: float, per_word: float = 1.0, pause: float = 3.0) -> list[tuple[float, float]]:
    """Split [start, end) seconds between the words of `text` in proportion to a length weight:
    letters+digits, plus `per_word`, plus `pause` if the word ends in , ; : . ! or ? (the pause after
    it). One (onset, offset) per whitespace word.

    The weights (1, 3) were picked among {0..3} x {0, 3, 6} on 200 synthesized clips against
    espeak's own word times and checked on 200 others: 74% of 80 ms audio tokens get the same word,
    onsets are off by 71 ms on average (plain letter counts, (0, 0): 66%, 102 ms).
    """
    words = split_words(text)
    if not words:
        return []
    w = np.array([_letters(x) + per_word + (pause if x[-1] in PAUSE_PUNCT else 0.0) for x, _, _ in words], dtype=np.float64)
    edges = start + (end - start) * np.concatenate([[0.0], np.cumsum(w) / w.sum()])
    return [(float(a), float(b)) for a, b in zip(edges[:-1], edges[1:])]


class _EspeakEvent(ctypes.Structure):  # espeak_EVENT of speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_EVENT_WORD, _EVENT_END = 1, 5  # espeakEVENT_WORD, espeakEVENT_END (end of a clause or sentence)
_EventCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent))
_events: list[tuple[int, int, int]] = []  # (type, text_position, sample) of the current utterance
_n_samples = [0]


@_EventCallback
def _on_events(wav, n_samples, events):
    i = 0
    while events[i].type != 0:  # espeakEVENT_LIST_TERMINATED
        e = events[i]
        _events.append((e.type, e.text_position, e.sample))
        i += 1
    if n_samples > 0:
        _n_samples[0] += n_samples
    return 0


def espeak_word_times(text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> tuple[list[tuple[float, float]], float]:
    """espeak-ng's own word timing for `text` spoken exactly as omni.tts.synthesize would speak it:
    ([(onset, offset)] per whitespace word, total seconds). A word's offset is the next word's onset
    (the last word ends where espeak's last clause ends); a whitespace word without a letter or digit
    (e.g. a lone dash) gets a zero-length span at the next onset.

    Runs the same fresh-library recipe as omni.tts (same lock, voice resolution, parameters, seeds)
    but keeps espeak's event list instead of the samples.
    """
    import _ctypes

    from omni import tts

    name = tts._resolve_voice(voice)
    lib_path, data = tts._paths()
    encoded = text.encode("utf-8")
    with tts._lock:
        lib = ctypes.CDLL(lib_path)
        try:
            sr = lib.espeak_Initialize(2, 0, str(data).encode(), 0x8000)  # SYNCHRONOUS, DONT_EXIT
            if sr <= 0:
                raise RuntimeError(f"espeak_Initialize failed (returned {sr}) with data at {data}")
            lib.espeak_SetSynthCallback(_on_events)
            if lib.espeak_SetVoiceByName(name.encode()) != 0:
                raise ValueError(f"espeak-ng refused voice {voice!r} (resolved to {name!r})")
            for param, value in ((1, rate), (3, pitch), (4, pitch_range), (2, 100)):  # rate, pitch, range, volume
                lib.espeak_SetParameter(param, int(value), 0)
            lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
            tts._libc().srand(0)
            _events.clear()
            _n_samples[0] = 0
            err = lib.espeak_Synth(encoded, len(encoded) + 1, 0, 0, 0, 1, None, None)  # espeakCHARS_UTF8
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed with status {err} for voice {voice!r}")
            events, total = list(_events), _n_samples[0]
        finally:
            lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)
    # text_position counts characters from 1. An event is given to the whitespace word holding that
    # character, or to the next word with a letter or digit: espeak reports "- slowly" as one word
    # at the dash. END events close clauses; the last one is where the speech ends.
    words = split_words(text)
    spoken = [any(c.isalnum() for c in w) for w, _, _ in words]
    onsets: list[float | None] = [None] * len(words)
    ends = [sample for kind, _, sample in events if kind == _EVENT_END]
    end = (max(ends) if ends else total) / sr
    for kind, pos, sample in events:
        if kind != _EVENT_WORD:
            continue
        i = next((j for j, (_, a, b) in enumerate(words) if pos - 1 < b), None)
        while i is not None and i < len(words) and not spoken[i]:
            i += 1
        if i is not None and i < len(words) and onsets[i] is None:
            onsets[i] = sample / sr
    spans = []
    for i in range(len(words)):
        nxt = next((o for o in onsets[i + 1 :] if o is not None), end)
        on = onsets[i] if onsets[i] is not None else nxt  # a word espeak does not speak: zero length
        spans.append((on, max(on, nxt)))
    return spans, total / sr


def token_words(spans: list[tuple[float, float]], n_tokens: int, seconds_per_token: float) -> np.ndarray:
    """Index of the word under each audio token's centre time, -1 where no word is."""
    out = np.full(n_tokens, -1, dtype=np.int64)
    centres = (np.arange(n_tokens) + 0.5) * seconds_per_token
    for i, (a, b) in enumerate(spans):
        out[(centres >= a) & (centres < b)] = i
    return out


def word_timing_agreement(pred: list[tuple[float, float]], ref: list[tuple[float, float]], n_tokens: int, seconds_per_token: float) -> dict[str, float]:
    """How well `pred` word times match `ref`: the fraction of audio tokens (those with a word in
    `ref`) given the same word, and the mean / median absolute onset error in seconds."""
    if len(pred) != len(ref):
        raise ValueError(f"word counts differ: {len(pred)} vs {len(ref)}")
    p, r = token_words(pred, n_tokens, seconds_per_token), token_words(ref, n_tokens, seconds_per_token)
    has = r >= 0
    err = np.abs(np.array([a for a, _ in pred]) - np.array([a for a, _ in ref]))
    return {
        "token_agreement": float(np.mean(p[has] == r[has])) if has.any() else float("nan"),
        "onset_error_mean": float(err.mean()) if len(err) else float("nan"),
        "onset_error_median": float(np.median(err)) if len(err) else float("nan"),
    }


# ---------------------------------------------------------------------------------------------
# Runs, clips and audio tokens


@dataclass
class VizConfig:
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
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32


STAGES = ("before", "after")
LABELS = ("voice", "gender", "accent", "variant", "style", "rate", "pitch", "rate_bucket", "pitch_bucket", "split")


def run_dirs(run: str) -> list[Path]:
    """`run` ("a,b,c") -> alignment model folders (those holding audio_path.json). Each item is a
    folder, a report folder holding model/, a grid report folder (every child */model, e.g. from
    `omni run experiments/alignment.yaml -p layer=[last,middle,weighted]`), or a 32-character MLflow
    run id (its `model` artifact)."""
    items = [r.strip() for r in str(run).split(",") if r.strip()]
    if not items:
        raise ValueError("no alignment run given: pass -p run=reports/alignment/<stamp> (or an MLflow run id; "
                         "comma-separate several runs to compare layer choices)")
    out = []
    for item in items:
        path = Path(item)
        if not path.exists() and len(item) == 32 and item.isalnum():
            import mlflow

            path = Path(mlflow.artifacts.download_artifacts(run_id=item, artifact_path="model"))
        if (path / "model" / "audio_path.json").exists():
            path = path / "model"
        if (path / "audio_path.json").exists():
            out.append(path)
            continue
        children = sorted(p.parent for p in path.glob("*/model/audio_path.json")) if path.is_dir() else []
        if not children:
            raise FileNotFoundError(f"run {item!r}: neither an alignment run folder (audio_path.json), nor a grid of them "
                                    "(*/model/audio_path.json), nor a known MLflow run id")
        out += children
    return out


def load_models(path: Path, device: str = "cpu"):
    """(trained SpeechLM, the same SpeechLM at its initialisation, meta) of one alignment run.

    The initial model shares the trained one's (frozen) GPT; its audio path is rebuilt exactly as
    run_alignment built it: torch.manual_seed(seed), then SpeechLM(...) with the run's config."""
    from omni.align import load_lm
    from omni.train import pick_device
    from omni.speech_lm import SpeechLM, SpeechLMConfig

    meta = json.loads((path / "audio_path.json").read_text())
    dev = pick_device(device)
    gpt, tok = load_lm(meta["lm"], dev)
    cfg = SpeechLMConfig(**meta["speech_lm"])
    torch.manual_seed(int(meta.get("align", {}).get("seed", 0)))
    before = SpeechLM(gpt, tok, meta["n_states"], meta["d_whisper"], cfg).to(dev).eval()
    after = SpeechLM(gpt, tok, meta["n_states"], meta["d_whisper"], cfg).to(dev)
    after.load_audio_path(path)
    after.eval()
    return after, before, meta


def open_cache(meta: dict):
    """The feature cache the run trained on. Its corpus must exist (paths in audio_path.json are as the
    run was given them, usually relative to the repository root); the cache is rebuilt if missing."""
    from omni.align import AlignConfig, prepare_cache

    align = meta.get("align")
    if not align:
        raise ValueError("audio_path.json has no `align` section: not written by omni.align.run_alignment")
    manifest = Path(align["corpus"]) / "manifest.jsonl"
    if not manifest.exists():  # never synthesize one here: a wrong working directory would cost minutes
        raise FileNotFoundError(f"the run's corpus manifest {manifest} does not exist (working directory {Path.cwd()}); "
                                "run from the folder the alignment ran in")
    fields = AlignConfig.__dataclass_fields__
    return prepare_cache(AlignConfig(**{k: v for k, v in align.items() if k in fields}))


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
    from omni.speech_lm import collate_states

    out = []
    device = model.gpt_device
    for i in range(0, len(rows), batch_size):
        states = cache.load_states(rows[i : i + batch_size])
        hidden, lengths = collate_states([s.float() for s in states])
        tokens, n = model.audio_tokens(hidden.to(device), lengths.to(device))
        out += [t[:m].float().cpu().numpy() for t, m in zip(tokens, n.tolist())]
    return out


@dataclass
class Clip:
    row: int  # cache row
    text: str
    labels: dict
    words: list[str]  # whitespace words of the transcript
    spans: list[tuple[float, float]]  # seconds, one per word
    timing: str  # espeak | chars
    token_word: np.ndarray  # (A,) word index under each audio token, -1 = none
    text_ids: list[int] = field(default_factory=list)  # transcript tokens
    word_ids: list[list[int]] = field(default_factory=list)  # tokens of each word (transcript tokenization)


def _is_synth(labels: dict) -> bool:
    return all(k in labels for k in ("voice", "rate", "pitch", "pitch_range"))


def clip_timing(row: dict, seconds: float, method: str = "auto") -> tuple[list[tuple[float, float]], str]:
    """Word spans of one cache row and the method that made them (see the module docstring)."""
    labels = row["labels"]
    if method not in ("auto", "espeak", "chars"):
        raise ValueError(f"word_timing={method!r}: choose auto, espeak or chars")
    if method != "chars" and _is_synth(labels):
        spans, total = espeak_word_times(row["text"], labels["voice"], int(labels["rate"]), int(labels["pitch"]), int(labels["pitch_range"]))
        if "duration" in labels and abs(total - float(labels["duration"])) < 1e-3:
            return spans, "espeak"
    if method == "espeak":
        raise ValueError(f"clip {row['audio']}: espeak timing needs a clip synthesized by omni.data.synth (voice, rate, "
                         "pitch, pitch_range and a matching duration)")
    return chars_word_times(row["text"], 0.0, seconds), "chars"


def word_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Tokens of each word as in the transcript " ".join(words): a leading space but for the first."""
    return [tokenizer.encode(w if i == 0 else " " + w) for i, w in enumerate(words)]


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


def token_table(gpt) -> np.ndarray:
    """(V, n_embd) float32: every token's embedding as the transformer sees it (GPT.embed)."""
    with torch.no_grad():
        ids = torch.arange(gpt.config.vocab_size, device=next(gpt.parameters()).device)[None]
        return gpt.embed(ids)[0].float().cpu().numpy()


def token_strings(tokenizer, vocab_size: int) -> list[str]:
    """Readable token strings: a leading space shows as '·', BOS as <bos>, control bytes escaped."""
    out = []
    for i in range(vocab_size):
        if i == tokenizer.bos_id:
            out.append("<bos>")
            continue
        s = tokenizer.decode([i])
        if "\ufffd" in s:  # a byte (or BPE piece) that is not valid UTF-8 alone
            out.append(f"<0x{i:02x}>" if isinstance(tokenizer, ByteTokenizer) else f"<{i}>")
            continue
        s = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)
        out.append(s.replace(" ", "·") if s.strip() else repr(s)[1:-1].replace(" ", "·") or "''")
    return out


# ---------------------------------------------------------------------------------------------
# Statistics and readout


def readout(tokens: np.ndarray, table: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Nearest LM tokens (cosine) of each audio token: (ids (A, k), sims (A, k)), nearest first."""
    return metrics.nearest_tokens(tokens, table, k=min(k, len(table)))


def _derange(n: int) -> np.ndarray:
    """i -> i+1 (mod n): every clip paired with another one (the mismatched control)."""
    return (np.arange(n) + 1) % n


def alignment_stats(tokens: list[np.ndarray], clips: list[Clip], table: np.ndarray, k: int = 5, candidates: int = 100, seed: int = 0) -> dict[str, float]:
    """How close audio tokens sit to the text they carry, in the LM's embedding space.

    tokens: per clip (A_i, D) audio tokens; clips: their transcripts and word timing; table: (V, D)
    token embeddings. Every "_control" value is the same statistic with the pairing broken (clip i
    against clip i+1's text, or the words shuffled among tokens): the level that means nothing.
    - cos_clip: cosine of a clip's mean audio token and the mean embedding of its transcript tokens
    - retrieval_a2t / _t2a: top-1 retrieval between those means among `candidates` clips (the sample
      cut into blocks of that size, a short last block dropped); retrieval_chance = 1 / candidates
    - rms_audio, rms_text (the whole table), rms_transcript (the clips' transcript tokens)
    - cka_word: linear CKA between audio tokens and the mean embedding of the word under each
    - nn_cos: cosine of each audio token to its nearest LM token (text_nn_cos: the same for the
      transcript tokens' nearest *other* token, the spacing of the table itself)
    - word_hit@k: an audio token's k nearest LM tokens include a token of its word
    - transcript_hit@k: ... include a token of its clip's transcript
    """
    n = len(clips)
    if n < 2 or len(tokens) != n:
        raise ValueError(f"need >= 2 clips with tokens, got {len(tokens)} token sets for {n} clips")
    g = np.random.default_rng(seed)
    a_mean = np.stack([t.mean(0) for t in tokens]).astype(np.float64)
    t_mean = np.stack([table[c.text_ids].mean(0) if c.text_ids else np.zeros(table.shape[1]) for c in clips]).astype(np.float64)
    other = _derange(n)
    out = {
        "cos_clip": float(metrics.rowwise_cosine(a_mean, t_mean).mean()),
        "cos_clip_control": float(metrics.rowwise_cosine(a_mean, t_mean[other]).mean()),
    }
    N = min(candidates, n)
    blocks = [slice(s, s + N) for s in range(0, n - N + 1, N)]
    out["retrieval_a2t"] = float(np.mean([metrics.retrieval_accuracy(a_mean[b], t_mean[b]) for b in blocks]))
    out["retrieval_t2a"] = float(np.mean([metrics.retrieval_accuracy(t_mean[b], a_mean[b]) for b in blocks]))
    out["retrieval_chance"] = metrics.retrieval_chance(N)
    out["retrieval_candidates"] = float(N)

    A = np.concatenate(tokens)
    out["rms_audio"] = metrics.rms(A)
    out["rms_text"] = metrics.rms(table)
    all_text = [i for c in clips for i in c.text_ids]
    out["rms_transcript"] = metrics.rms(table[all_text]) if all_text else float("nan")

    # per audio token: its word's mean embedding, its word's token set, its clip
    word_emb = np.zeros_like(A, dtype=np.float64)
    has_word = np.zeros(len(A), dtype=bool)
    word_sets: list[set[int]] = []
    clip_of = np.concatenate([np.full(len(t), i) for i, t in enumerate(tokens)])
    s = 0
    for c, t in zip(clips, tokens):
        for j in range(len(t)):
            w = int(c.token_word[j]) if j < len(c.token_word) else -1
            ok = w >= 0 and len(c.word_ids[w]) > 0
            has_word[s + j] = ok
            word_sets.append(set(c.word_ids[w]) if ok else set())
            if ok:
                word_emb[s + j] = table[c.word_ids[w]].mean(0)
        s += len(t)
    out["tokens_with_word"] = float(has_word.mean())
    if has_word.sum() > 2:
        X, Y = A[has_word], word_emb[has_word]
        out["cka_word"] = metrics.linear_cka(X, Y)
        out["cka_word_control"] = metrics.linear_cka(X, Y[g.permutation(len(Y))])
    ids, sims = readout(A, table, k)
    out["nn_cos"] = float(sims[:, 0].mean())
    if all_text:
        _, tsims = metrics.nearest_tokens(table[sorted(set(all_text))], table, k=min(2, len(table)))
        out["text_nn_cos"] = float(tsims[:, -1].mean())
    if has_word.any():
        hit = np.array([bool(set(ids[i].tolist()) & word_sets[i]) for i in np.nonzero(has_word)[0]])
        perm = np.nonzero(has_word)[0][g.permutation(int(has_word.sum()))]
        ctl = np.array([bool(set(ids[i].tolist()) & word_sets[j]) for i, j in zip(np.nonzero(has_word)[0], perm)])
        out[f"word_hit@{k}"] = float(hit.mean())
        out[f"word_hit@{k}_control"] = float(ctl.mean())
    text_sets = [set(c.text_ids) for c in clips]
    out[f"transcript_hit@{k}"] = float(np.mean([bool(set(ids[i].tolist()) & text_sets[clip_of[i]]) for i in range(len(A))]))
    out[f"transcript_hit@{k}_control"] = float(np.mean([bool(set(ids[i].tolist()) & text_sets[other[clip_of[i]]]) for i in range(len(A))]))
    return out


# ---------------------------------------------------------------------------------------------
# The shared map

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


# ---------------------------------------------------------------------------------------------
# One call per report


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


def analyse(cfg: VizConfig, log=print) -> list[RunViz]:
    """Everything the report shows, for every run in cfg.run (see VizConfig)."""
    paths = run_dirs(cfg.run)
    metas = [json.loads((p / "audio_path.json").read_text()) for p in paths]
    names = _run_names(metas, paths)
    out = []
    checked: dict[str, dict] = {}
    for path, name in zip(paths, names):
        after, before, meta = load_models(path, cfg.device)
        cache = open_cache(meta)
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


# ---------------------------------------------------------------------------------------------
# Static figures (matplotlib)


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


STAGE_COLOURS = {"before": "#e6862a", "after": "#2a6fd6"}


def _text_layer(ax, rv: RunViz, xy: np.ndarray, annotate: int = 0) -> None:
    t = rv.map.kind == 0
    ax.scatter(xy[t, 0], xy[t, 1], s=3, c="#c8c8c8", lw=0, label="LM tokens")
    if annotate:
        counts: dict[int, int] = {}
        for c in rv.clips:
            for i in c.text_ids:
                counts[i] = counts.get(i, 0) + 1
        where = {int(tok): n for n, tok in enumerate(rv.map.pos) if rv.map.kind[n] == 0}
        for tok in sorted(counts, key=lambda i: -counts[i])[:annotate]:
            if tok in where:
                x, y = xy[where[tok]]
                ax.annotate(rv.strings[tok], (x, y), fontsize=6, color="#555")


def map_figure(rv: RunViz, projection: str = "pca", annotate: int = 12):
    """Before | after panels: LM tokens grey (the most frequent transcript tokens named), audio tokens on top."""
    import matplotlib.pyplot as plt

    xy = rv.map.xy[projection]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharex=True, sharey=True)
    for ax, stage in zip(axes, STAGES):
        _text_layer(ax, rv, xy, annotate)
        a = rv.map.kind == KIND_NAMES.index(stage)
        ax.scatter(xy[a, 0], xy[a, 1], s=5, c=STAGE_COLOURS[stage], lw=0, alpha=0.7, label=f"audio tokens {stage} training")
        ax.set_title(f"{stage} training")
        ax.legend(loc="best", fontsize=7, markerscale=3)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{rv.name}: {projection.upper()} of LM token embeddings and audio tokens (one fit for both panels)")
    fig.tight_layout()
    return fig


def label_figure(rv: RunViz, projection: str = "pca", labels: tuple[str, ...] = ("voice", "gender", "rate", "pitch", "word"), top_words: int = 10):
    """Rows before / after, one column per label: audio tokens coloured by it over the grey LM tokens."""
    import matplotlib.pyplot as plt

    xy = rv.map.xy[projection]
    fig, axes = plt.subplots(2, len(labels), figsize=(3.3 * len(labels), 6.6), squeeze=False)
    for col, label in enumerate(labels):
        values = point_label(rv, label)
        audio = [v for v, k in zip(values, rv.map.kind) if k > 0]
        numeric = audio and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in audio)
        if label == "word":
            counts: dict[str, int] = {}
            for v in audio:
                if v:
                    counts[v] = counts.get(v, 0) + 1
            cats = sorted(counts, key=lambda w: (-counts[w], w))[:top_words]
        else:
            cats = sorted({str(v) for v in audio})
        for row, stage in enumerate(STAGES):
            ax = axes[row, col]
            _text_layer(ax, rv, xy)
            a = np.nonzero(rv.map.kind == KIND_NAMES.index(stage))[0]
            if numeric:
                sc = ax.scatter(xy[a, 0], xy[a, 1], s=5, c=[values[i] for i in a], cmap="viridis", lw=0)
                fig.colorbar(sc, ax=ax, fraction=0.046)
            else:
                cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")  # tab20 pairs look alike
                colour = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
                rest = [i for i in a if str(values[i]) not in colour]
                ax.scatter(xy[rest, 0], xy[rest, 1], s=4, c="#9a9a9a", lw=0, alpha=0.5)
                for c in cats:
                    sel = [i for i in a if str(values[i]) == c]
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=5, color=colour[c], lw=0, label=c or "(silence)")
                if len(cats) <= 12 and row == 0:
                    ax.legend(fontsize=6, markerscale=2.5, loc="best")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label} ({stage})" + (" [top words]" if label == "word" else "") + (f" [{len(cats)} values]" if not numeric and len(cats) > 12 and label != "word" else ""), fontsize=9)
    fig.suptitle(f"{rv.name}: {projection.upper()}, audio tokens by label", y=1.0)
    fig.tight_layout()
    return fig


def stats_figure(runs: list[RunViz], keys: tuple[str, ...] = ("cos_clip", "retrieval_a2t", "retrieval_t2a", "cka_word")):
    """Bars: each statistic before vs after, per run; the control / chance level as a tick."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.4), squeeze=False)
    w = 0.38
    for ax, key in zip(axes[0], keys):
        for j, stage in enumerate(STAGES):
            vals = [r.stats[stage].get(key, np.nan) for r in runs]
            ax.bar(np.arange(len(runs)) + (j - 0.5) * w, vals, w, color=STAGE_COLOURS[stage], label=stage)
            ref = [r.stats[stage].get("retrieval_chance" if key.startswith("retrieval") else f"{key}_control", np.nan) for r in runs]
            ax.scatter(np.arange(len(runs)) + (j - 0.5) * w, ref, marker="_", s=300, color="k", zorder=3,
                       label="chance / control" if j == 0 else None)
        ax.set_xticks(np.arange(len(runs)))
        ax.set_xticklabels([r.name.replace(" ", "\n", 1) for r in runs], fontsize=7)
        ax.set_title(key)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Nearest-token readout (HTML)

_READOUT_CSS = """<style>
.ro{font-family:system-ui,sans-serif;font-size:12px} .ro .clip{margin:0 0 18px 0}
.ro .tx{font-size:14px;margin:2px 0} .ro .lb{color:#666;margin-bottom:4px}
.ro .sc{overflow-x:auto;max-width:100%} .ro table{border-collapse:collapse}
.ro td{border:1px solid #eee;padding:1px 4px;white-space:nowrap;font-family:ui-monospace,monospace;text-align:center}
.ro td.h{font-family:system-ui,sans-serif;color:#666;text-align:right;position:sticky;left:0;background:#fff}
.ro td.w{background:#f4f6fa;font-family:system-ui,sans-serif;font-weight:600} .ro td.s{color:#bbb}
.ro td.hit{background:#c9f0c9} .ro td.tr{background:#eef8e6} .ro tr.sep td{border-top:2px solid #999}
</style>"""


def _word_cells(clip: Clip, n: int) -> str:
    cells, j = [], 0
    while j < n:
        w = int(clip.token_word[j]) if j < len(clip.token_word) else -1
        span = 1
        while j + span < n and (int(clip.token_word[j + span]) if j + span < len(clip.token_word) else -1) == w:
            span += 1
        text = html.escape(clip.words[w]) if w >= 0 else "·"
        cells.append(f'<td class="{"w" if w >= 0 else "s"}" colspan="{span}">{text}</td>')
        j += span
    return "".join(cells)


def readout_html(rv: RunViz, clip_indices: list[int], k: int = 3) -> str:
    """Per clip: the transcript, then one column per audio token: its time, the word under it, and
    its k nearest LM tokens after training and before (green: a token of that word; pale green:
    of the transcript). Hover a cell for its cosine."""
    parts = [_READOUT_CSS, '<div class="ro">']
    for ci in clip_indices:
        c = rv.clips[ci]
        n = len(rv.tokens["after"][ci])
        lab = ", ".join(f"{key}={c.labels[key]}" for key in LABELS if key in c.labels)
        parts.append(f'<div class="clip"><div class="tx">“{html.escape(c.text)}”</div>'
                     f'<div class="lb">{html.escape(lab)}; word timing: {c.timing}</div><div class="sc"><table>')
        parts.append('<tr><td class="h">t (s)</td>' + "".join(f"<td>{(j + 0.5) * rv.seconds_per_token:.2f}</td>" for j in range(n)) + "</tr>")
        parts.append('<tr><td class="h">word</td>' + _word_cells(c, n) + "</tr>")
        text_set = set(c.text_ids)
        for stage in ("after", "before"):
            ids, sims = rv.nn[stage][ci]
            for r in range(min(k, ids.shape[1])):
                row = []
                for j in range(n):
                    w = int(c.token_word[j]) if j < len(c.token_word) else -1
                    tok = int(ids[j, r])
                    cls = "hit" if w >= 0 and tok in c.word_ids[w] else ("tr" if tok in text_set else "")
                    row.append(f'<td class="{cls}" title="cos {sims[j, r]:.3f}">{html.escape(rv.strings[tok])}</td>')
                sep = ' class="sep"' if r == 0 else ""
                parts.append(f'<tr{sep}><td class="h">{stage} #{r + 1}</td>' + "".join(row) + "</tr>")
        parts.append("</table></div></div>")
    parts.append("</div>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Interactive page: one self-contained HTML file, no network


def _finite(x):
    """JSON has no NaN/inf: they become null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _payload(rv: RunViz, digits: int = 4) -> dict:
    audio = rv.map.kind > 0
    nn_ids, nn_sims = [], []
    for kind, c, p in zip(rv.map.kind, rv.map.clip, rv.map.pos):
        if kind == 0:
            nn_ids.append(None)
            nn_sims.append(None)
        else:
            ids, sims = rv.nn[KIND_NAMES[kind]][c]
            nn_ids.append(ids[p].tolist())
            nn_sims.append([round(float(s), 3) for s in sims[p]])
    used = set(rv.map.pos[~audio].tolist()) | {i for row in nn_ids if row for i in row} | {i for c in rv.clips for i in c.text_ids}
    clips = [{"text": c.text, "words": c.words, "timing": c.timing, "tw": c.token_word.tolist(),
              "labels": {k: c.labels[k] for k in LABELS if k in c.labels}, "ids": sorted(set(c.text_ids))} for c in rv.clips]
    return {
        "name": rv.name, "spt": rv.seconds_per_token, "stats": _finite(rv.stats), "timing": _finite(rv.timing_check),
        "kind": rv.map.kind.tolist(), "clip": rv.map.clip.tolist(), "pos": rv.map.pos.tolist(),
        "xy": {k: np.round(v.astype(np.float64), digits).ravel().tolist() for k, v in rv.map.xy.items()},
        "nn": nn_ids, "nns": nn_sims, "clips": clips, "vocab": {str(i): rv.strings[i] for i in sorted(used)},
    }


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>__TITLE__</title><style>
body{font-family:system-ui,sans-serif;margin:1em 2em;color:#222} #bar>*{margin-right:.8em}
#wrap{position:relative;display:inline-block} canvas{border:1px solid #ddd;cursor:crosshair}
#tip{position:absolute;pointer-events:none;background:#fffffb;border:1px solid #999;padding:6px 8px;font-size:12px;
max-width:420px;display:none;box-shadow:2px 2px 6px rgba(0,0,0,.15)} #legend{font-size:12px;margin:.4em 0;max-width:980px}
#legend span{display:inline-block;margin-right:10px} #legend i{display:inline-block;width:10px;height:10px;margin-right:3px;border-radius:5px}
table{border-collapse:collapse;font-size:12px} td,th{border-bottom:1px solid #eee;padding:2px 8px;text-align:right}
th:first-child,td:first-child{text-align:left} .note{color:#666;font-size:12px;max-width:980px}
</style></head><body><h2>__TITLE__</h2>
<div id="bar">run <select id="run"></select> map <select id="proj"></select> show <select id="show">
<option value="all">LM tokens + audio before + after</option><option value="before">LM tokens + audio before</option>
<option value="after" selected>LM tokens + audio after</option><option value="text">LM tokens only</option></select>
colour <select id="colour"></select> find word/token <input id="find" size="12" placeholder="e.g. the"></div>
<div class="note">Hover a point for its clip, word and nearest LM tokens; click an audio token to pin its clip
(its tokens joined in time order, before and after); click empty space to unpin.</div>
<div id="wrap"><canvas id="cv" width="980" height="640"></canvas><div id="tip"></div></div>
<div id="legend"></div><h3>Statistics</h3><div id="stats"></div><p class="note">__NOTE__</p>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = id => document.getElementById(id), cv = $("cv"), ctx = cv.getContext("2d"), tip = $("tip");
const PAL = ["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2","#17becf","#bcbd22","#7f7f7f",
  "#aec7e8","#ffbb78","#98df8a","#ff9896","#c5b0d5","#c49c94","#f7b6d2","#9edae5","#dbdb8d","#393b79"];
const VIR = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
const STAGE = {1: "#e6862a", 2: "#2a6fd6"}, KIND = ["LM token", "before", "after"];
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"})[c]);
let R, P = [], pinned = -1, colours = null, legend = "";
D.runs.forEach((r, i) => $("run").add(new Option(r.name, i)));
function label(i, key) {
  const k = R.kind[i]; if (k === 0) return null;
  const c = R.clips[R.clip[i]], p = R.pos[i];
  if (key === "stage") return KIND[k];
  if (key === "word") { const w = c.tw[p]; return w >= 0 ? c.words[w].toLowerCase().replace(/[^\\w']/g, "") : ""; }
  if (key === "position") return (p + 0.5) * R.spt;
  if (key === "clip") return R.clip[i];
  return c.labels[key] === undefined ? "" : c.labels[key];
}
function setRun() {
  R = D.runs[+$("run").value];
  $("proj").innerHTML = ""; Object.keys(R.xy).forEach(k => $("proj").add(new Option(k.toUpperCase(), k)));
  const keys = ["stage", "word", "position", "clip"].concat(Object.keys(R.clips[0] ? R.clips[0].labels : {}));
  const old = $("colour").value; $("colour").innerHTML = ""; keys.forEach(k => $("colour").add(new Option(k, k)));
  $("colour").value = keys.includes(old) ? old : "stage";
  stats(); setColour();
}
function setColour() {
  const key = $("colour").value, n = R.kind.length, vals = [];
  for (let i = 0; i < n; i++) vals.push(label(i, key));
  colours = new Array(n).fill("#c8c8c8"); legend = "";
  const audio = vals.filter((v, i) => R.kind[i] > 0);
  if (key === "stage") { for (let i = 0; i < n; i++) if (R.kind[i]) colours[i] = STAGE[R.kind[i]];
    legend = '<span><i style="background:#e6862a"></i>audio before training</span><span><i style="background:#2a6fd6"></i>audio after</span><span><i style="background:#c8c8c8"></i>LM tokens</span>';
  } else if (audio.length && audio.every(v => typeof v === "number") && key !== "clip") {
    const lo = Math.min(...audio), hi = Math.max(...audio);
    for (let i = 0; i < n; i++) if (R.kind[i]) { const t = hi > lo ? (vals[i] - lo) / (hi - lo) : 0.5, f = t * 4, j = Math.min(3, Math.floor(f)), u = f - j;
      colours[i] = "rgb(" + VIR[j].map((a, m) => Math.round(a + (VIR[j + 1][m] - a) * u)).join(",") + ")"; }
    legend = key + ": " + lo.toFixed(2) + ' <span style="display:inline-block;width:160px;height:10px;background:linear-gradient(90deg,' +
      VIR.map(c => "rgb(" + c + ")").join(",") + ')"></span> ' + hi.toFixed(2);
  } else {
    const count = {}; audio.forEach(v => { count[v] = (count[v] || 0) + 1; });
    const cats = Object.keys(count).filter(c => c !== "").sort((a, b) => count[b] - count[a] || (a < b ? -1 : 1)).slice(0, PAL.length);
    const col = {}; cats.forEach((c, j) => { col[c] = PAL[j]; });
    for (let i = 0; i < n; i++) if (R.kind[i]) colours[i] = col[vals[i]] || "#8a8a8a";
    legend = cats.map(c => '<span><i style="background:' + col[c] + '"></i>' + esc(c) + " (" + count[c] + ")</span>").join("") +
      (Object.keys(count).length > cats.length ? "<span>other / silence: grey</span>" : "");
  }
  $("legend").innerHTML = legend; draw();
}
const fmt = v => v === null || v === undefined ? "–" : (+v).toFixed(3);
function stats() {
  const st = R.stats, keys = Object.keys(st.before);
  let h = "<table><tr><th>statistic</th><th>before</th><th>after</th></tr>";
  keys.forEach(k => { h += "<tr><td>" + esc(k) + "</td><td>" + fmt(st.before[k]) + "</td><td>" + fmt(st.after[k]) + "</td></tr>"; });
  h += "</table>";
  if (R.timing && R.timing.clips) h += '<p class="note">Word timing check (chars vs espeak, ' + R.timing.clips + " clips): " +
    (100 * R.timing.token_agreement).toFixed(1) + "% of audio tokens get the same word, onset error " + (1000 * R.timing.onset_error_mean).toFixed(0) + " ms on average.</p>";
  $("stats").innerHTML = h;
}
function visible(i) {
  const s = $("show").value, k = R.kind[i];
  return k === 0 || s === "all" || (s === "before" && k === 1) || (s === "after" && k === 2);
}
function draw() {
  const xy = R.xy[$("proj").value], n = R.kind.length, W = cv.width, H = cv.height, pad = 20;
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (let i = 0; i < n; i++) { const x = xy[2 * i], y = xy[2 * i + 1];  // all points: the frame never moves
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  const sx = (W - 2 * pad) / ((x1 - x0) || 1), sy = (H - 2 * pad) / ((y1 - y0) || 1);
  P = new Array(n);
  for (let i = 0; i < n; i++) P[i] = [pad + (xy[2 * i] - x0) * sx, H - pad - (xy[2 * i + 1] - y0) * sy];
  ctx.clearRect(0, 0, W, H);
  const q = $("find").value.trim().toLowerCase(), hit = i => {
    if (!q) return false;
    if (R.kind[i] === 0) return (R.vocab[R.pos[i]] || "").replace(/·/g, "").toLowerCase() === q;
    return label(i, "word") === q; };
  for (const pass of [0, 1, 2]) for (let i = 0; i < n; i++) {
    if (!visible(i)) continue;
    const h = hit(i);  // passes: LM tokens, audio tokens, then whatever the search found, on top
    if (pass === 2 ? !h : h || (pass === 0) !== (R.kind[i] === 0)) continue;
    ctx.globalAlpha = q && !h ? 0.25 : 1;
    ctx.fillStyle = h ? "#d00" : colours[i];
    const r = h ? 4 : (R.kind[i] ? 2.2 : 1.6);
    ctx.beginPath(); ctx.arc(P[i][0], P[i][1], r, 0, 6.2832); ctx.fill();
  }
  ctx.globalAlpha = 1;
  if (pinned >= 0) for (const k of [1, 2]) {
    const idx = []; for (let i = 0; i < n; i++) if (R.kind[i] === k && R.clip[i] === pinned && visible(i)) idx.push(i);
    idx.sort((a, b) => R.pos[a] - R.pos[b]);
    ctx.strokeStyle = STAGE[k]; ctx.lineWidth = 1.2; ctx.beginPath();
    idx.forEach((i, j) => j ? ctx.lineTo(P[i][0], P[i][1]) : ctx.moveTo(P[i][0], P[i][1])); ctx.stroke();
    idx.forEach(i => { ctx.fillStyle = STAGE[k]; ctx.beginPath(); ctx.arc(P[i][0], P[i][1], 3.5, 0, 6.2832); ctx.fill(); });
  }
}
function nearest(ev) {
  const b = cv.getBoundingClientRect(), mx = (ev.clientX - b.left) * cv.width / b.width, my = (ev.clientY - b.top) * cv.height / b.height;
  let best = -1, bd = 64;
  for (let i = 0; i < P.length; i++) if (visible(i)) { const d = (P[i][0] - mx) ** 2 + (P[i][1] - my) ** 2;
    if (d < bd || (d === bd && R.kind[i] > 0)) { bd = d; best = i; } }
  return best;
}
function describe(i) {
  if (R.kind[i] === 0) { const t = R.pos[i]; const n = R.clips.filter(c => c.ids.includes(t)).length;
    return "<b>LM token</b> " + t + " <code>" + esc(R.vocab[t]) + "</code><br>in " + n + " of the " + R.clips.length + " transcripts"; }
  const c = R.clips[R.clip[i]], p = R.pos[i], w = c.tw[p];
  const text = c.words.map((x, j) => j === w ? "<b><u>" + esc(x) + "</u></b>" : esc(x)).join(" ");
  const lab = Object.entries(c.labels).map(([k, v]) => k + "=" + esc(v)).join(", ");
  const nn = R.nn[i].map((t, j) => "<code>" + esc(R.vocab[t]) + "</code> " + R.nns[i][j].toFixed(2)).join(", ");
  return "<b>audio token " + KIND[R.kind[i]] + " training</b>, clip " + R.clip[i] + ", token " + p + " (t=" + ((p + 0.5) * R.spt).toFixed(2) +
    " s, word " + (w >= 0 ? "<b>" + esc(c.words[w]) + "</b>" : "none") + ", timing " + c.timing + ")<br>" + text +
    '<br><span style="color:#666">' + lab + "</span><br>nearest LM tokens: " + nn;
}
cv.addEventListener("mousemove", ev => { const i = nearest(ev); if (i < 0) { tip.style.display = "none"; return; }
  tip.innerHTML = describe(i); tip.style.display = "block";
  const b = cv.getBoundingClientRect(), x = ev.clientX - b.left, y = ev.clientY - b.top;
  tip.style.left = Math.min(x + 14, cv.clientWidth - 430) + "px"; tip.style.top = (y + 14) + "px"; });
cv.addEventListener("mouseleave", () => { tip.style.display = "none"; });
cv.addEventListener("click", ev => { const i = nearest(ev); pinned = i >= 0 && R.kind[i] > 0 ? R.clip[i] : -1; draw(); });
$("run").onchange = () => { pinned = -1; setRun(); };
$("proj").onchange = draw; $("show").onchange = draw; $("colour").onchange = setColour; $("find").oninput = draw;
setRun();
</script></body></html>
"""


def write_interactive(path: str | Path, runs: list[RunViz], title: str = "omni: audio tokens in the LM's embedding space", note: str = "") -> Path:
    """One self-contained HTML file: inline JSON and JS, a canvas; nothing loaded from the network."""
    data = json.dumps({"runs": [_payload(r) for r in runs]}, separators=(",", ":")).replace("</", "<\\/")
    page = _PAGE.replace("__TITLE__", html.escape(title)).replace("__NOTE__", html.escape(note)).replace("__DATA__", data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path



_REMOTE = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import|<link\b|<iframe\b""", re.I)


def remote_references(page: str) -> list[str]:
    """What in an HTML page would reach the network (script/link/img sources, CSS imports/urls);
    the inline JSON payload is skipped, since transcripts may mention a URL as text."""
    head, _, rest = page.partition('<script type="application/json" id="data">')
    _, _, tail = rest.partition("</script>")
    return [m.group(0) for m in _REMOTE.finditer(head + tail)]
