"""Offline English speech from espeak-ng, driven through ctypes (the library and its data ship in
the PyPI package `espeakng-loader`; no system install, no network).

Design choices:
- The library is loaded fresh for every utterance (dlopen, initialise, synthesise, terminate,
  dlclose). espeak-ng keeps synthesis state in C statics that no API resets (pitch flutter index,
  glottal phase, echo buffer, noise generators), so a long-lived instance gives different samples
  for the same call depending on what it said before. A fresh load costs about 1 ms and makes every
  call a pure function of its arguments. Cost: espeak_Terminate does not free everything, so each
  call leaks about 3 KB; run very large synthesis jobs in worker processes.
- Breath/whisper noise comes from espeak's own generator and from libc rand(); both are seeded
  with 0 before each utterance (this re-seeds the process's libc rand(), which Python, numpy and
  torch do not use).
- One lock serialises calls in a process: the library's state is process-global. Nothing is
  initialised at import and the lock is re-created after fork, so worker processes (fork or spawn)
  are safe.
- Voices are "LANGUAGE[+VARIANT]": LANGUAGE is an espeak language code ("en-us", "en-gb",
  "en-gb-scotland", ...) or a voice file ("gmw/en-US"); VARIANT a file under espeak-ng-data/voices/!v
  ("f3", "m2", "klatt", "whisper", ...). Both are checked against the data folder because
  espeak-ng silently ignores an unknown variant.
- Output: espeak speaks at 22050 Hz; soxr resamples to 16 kHz float32 in [-1, 1].
- Word timing (`word_times`) is the same synthesis with espeak's word events kept: one driver
  (`_speak`), so the times describe exactly the samples `synthesize` returns. `chars_word_times`
  is the fallback for speech espeak did not make: the clip's duration split by word length.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from pathlib import Path

import numpy as np
import soxr
import torch

SAMPLE_RATE = 16000  # same as omni.data.audio.SAMPLE_RATE; not imported so tts has no dependency on audio

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # without it espeak_Initialize calls exit() when the data is missing
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4
_RATE_MIN, _RATE_MAX = 80, 450  # espeakRATE_MINIMUM / espeakRATE_MAXIMUM, words per minute

# Voice files that are English by code but not for ordinary English text.
_NOT_FOR_ENGLISH_TEXT = {"en-shaw"}  # reads the Shavian alphabet

_lock = threading.Lock()
_chunks: list[np.ndarray] = []


def _reset_lock_after_fork() -> None:
    # A lock held by another thread at fork time would stay held forever in the child.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_after_fork)

class _Event(ctypes.Structure):  # espeak_EVENT of speak_lib.h
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_EVENT_WORD, _EVENT_END = 1, 5  # espeakEVENT_WORD, espeakEVENT_END (end of a clause or sentence)
_events: list[tuple[int, int, int]] = []  # (type, text_position, sample) of the current utterance
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@_SynthCallback
def _on_samples(wav, n_samples, events):  # called by espeak_Synth, in this thread, per chunk
    if n_samples > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
    i = 0
    while events[i].type != 0:  # espeakEVENT_LIST_TERMINATED
        _events.append((events[i].type, events[i].text_position, events[i].sample))
        i += 1
    return 0  # 0 = continue synthesis


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)  # the process's C library, for srand


@functools.cache
def _paths() -> tuple[str, Path]:
    import espeakng_loader

    lib = espeakng_loader.get_library_path()
    data = Path(espeakng_loader.get_data_path())
    if not Path(lib).is_file():
        raise RuntimeError(f"espeak-ng library not found at {lib} (reinstall espeakng-loader)")
    return lib, data


@functools.cache
def _catalog() -> dict[str, tuple[int, str]]:
    """language code or voice-file identifier (lower case) -> (priority, identifier).

    Parsed from espeak-ng-data/lang/** exactly as espeak lists voices: each file is a voice whose
    identifier is its path under lang/, with "language CODE [PRIORITY]" lines (lower = preferred).
    """
    _, data = _paths()
    best: dict[str, tuple[int, str]] = {}
    for f in sorted((data / "lang").rglob("*")):
        if not f.is_file():
            continue
        ident = f.relative_to(data / "lang").as_posix()
        best[ident.lower()] = (0, ident)
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "language":
                code = parts[1].lower()
                prio = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 5
                if code not in best or prio < best[code][0]:
                    best[code] = (prio, ident)
    return best


@functools.cache
def _primary_codes() -> dict[str, str]:
    """voice-file identifier -> its first (primary) language code."""
    _, data = _paths()
    out = {}
    for f in sorted((data / "lang").rglob("*")):
        if f.is_file():
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "language":
                    out[f.relative_to(data / "lang").as_posix()] = parts[1].lower()
                    break
    return out


def list_variants() -> list[str]:
    """Voice variants (names under espeak-ng-data/voices/!v), usable as "en-us+NAME"."""
    _, data = _paths()
    return sorted(p.name for p in (data / "voices" / "!v").iterdir() if p.is_file())


def list_english_voices() -> list[str]:
    """Language codes of the English voices, one per voice file: en-029, en-gb, en-us, ..."""
    codes = {code for code in _primary_codes().values() if code.split("-")[0] == "en"}
    return sorted(codes - _NOT_FOR_ENGLISH_TEXT)


def _resolve_voice(voice: str) -> str:
    """"en-gb+m2" -> "gmw/en+m2", the name espeak_SetVoiceByName accepts for sure.

    espeak's own lookup matches file names, not language codes: "en-us" works by luck (its file is
    en-US) but "en-gb" fails (its file is "en"), hence our own code -> file table.
    """
    if not isinstance(voice, str) or not voice.strip():
        raise ValueError(f"voice must be a non-empty string like 'en-us' or 'en-us+f3', got {voice!r}")
    lang, _, variant = voice.strip().partition("+")
    entry = _catalog().get(lang.lower())
    if entry is None:
        raise ValueError(
            f"unknown espeak-ng voice {voice!r}: language {lang!r} not found; "
            f"English voices: {', '.join(list_english_voices())} (any espeak language code works)"
        )
    name = entry[1]
    if variant:
        variants = list_variants()
        if variant not in variants:
            raise ValueError(
                f"unknown espeak-ng voice variant {variant!r} in voice {voice!r}; "
                f"variants: {', '.join(variants)}"
            )
        name += "+" + variant
    return name


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _speak(text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> tuple[int, np.ndarray, list[tuple[int, int, int]]]:
    """The one espeak-ng driver: (sample rate, int16 samples, [(event type, text position, sample)])."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    _check_int("rate", rate, _RATE_MIN, _RATE_MAX)
    _check_int("pitch", pitch, 0, 99)
    _check_int("pitch_range", pitch_range, 0, 99)
    name = _resolve_voice(voice)
    lib_path, data = _paths()
    encoded = text.encode("utf-8")

    with _lock:
        import _ctypes

        lib = ctypes.CDLL(lib_path)  # fresh statics: see the module docstring
        try:
            sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(data).encode(), _INITIALIZE_DONT_EXIT)
            if sr <= 0:
                raise RuntimeError(f"espeak_Initialize failed (returned {sr}) with data at {data}")
            lib.espeak_SetSynthCallback(_on_samples)
            if lib.espeak_SetVoiceByName(name.encode()) != 0:
                raise ValueError(f"espeak-ng refused voice {voice!r} (resolved to {name!r})")
            for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range), (_PARAM_VOLUME, 100)):
                lib.espeak_SetParameter(param, int(value), 0)
            lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
            _libc().srand(0)
            _chunks.clear()
            _events.clear()
            err = lib.espeak_Synth(encoded, len(encoded) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed with status {err} for voice {voice!r}")
            pcm = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
            events = list(_events)
            _chunks.clear()
            _events.clear()
        finally:
            lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)
    return sr, pcm, events


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> torch.Tensor:
    """Speak `text`; returns float32 1-D mono at 16 kHz. Deterministic: same arguments, same samples.

    rate: words per minute (80-450); pitch, pitch_range: 0-99 (50 = the voice's own).
    """
    sr, pcm, _ = _speak(text, voice, rate, pitch, pitch_range)
    if pcm.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {text!r} with voice {voice!r}")
    wave = pcm.astype(np.float32) / 32768.0
    wave = soxr.resample(wave, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return torch.from_numpy(np.clip(wave, -1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# word timing: which word is spoken when


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Whitespace words with their character spans: [(word, start, end)]."""
    return [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def word_times(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> tuple[list[tuple[float, float]], float]:
    """espeak-ng's own word timing for `text` spoken exactly as `synthesize` speaks it (the same
    call, events kept): ([(onset, offset)] seconds per whitespace word, total seconds). A word's
    offset is the next word's onset (the last word ends where espeak's last clause ends); a
    whitespace word without a letter or digit (e.g. a lone dash) gets a zero-length span at the
    next onset."""
    sr, pcm, events = _speak(text, voice, rate, pitch, pitch_range)
    total = len(pcm)
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


PAUSE_PUNCT = ",;:.!?"


def chars_word_times(text: str, start: float, end: float, per_word: float = 1.0, pause: float = 3.0) -> list[tuple[float, float]]:
    """Split [start, end) seconds between the words of `text` in proportion to a length weight:
    letters+digits, plus `per_word`, plus `pause` if the word ends in , ; : . ! or ? (the pause after
    it). One (onset, offset) per whitespace word; for any corpus, where `word_times` needs the voice.

    The weights (1, 3) were picked among {0..3} x {0, 3, 6} on 200 synthesized clips against
    espeak's own word times and checked on 200 others: 74% of 80 ms audio tokens get the same word,
    onsets are off by 71 ms on average (plain letter counts, (0, 0): 66%, 102 ms).
    """
    words = split_words(text)
    if not words:
        return []
    w = np.array([max(1, sum(c.isalnum() for c in x)) + per_word + (pause if x[-1] in PAUSE_PUNCT else 0.0) for x, _, _ in words])
    edges = start + (end - start) * np.concatenate([[0.0], np.cumsum(w) / w.sum()])
    return [(float(a), float(b)) for a, b in zip(edges[:-1], edges[1:])]


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
