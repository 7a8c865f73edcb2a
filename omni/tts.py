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
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from pathlib import Path

import numpy as np
import soxr
import torch

SAMPLE_RATE = 16000  # same as omni.audio.SAMPLE_RATE; not imported so tts has no dependency on audio

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

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@_SynthCallback
def _on_samples(wav, n_samples, events):  # called by espeak_Synth, in this thread, per chunk
    if n_samples > 0:
        _chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
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


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> torch.Tensor:
    """Speak `text`; returns float32 1-D mono at 16 kHz. Deterministic: same arguments, same samples.

    rate: words per minute (80-450); pitch, pitch_range: 0-99 (50 = the voice's own).
    """
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
            err = lib.espeak_Synth(encoded, len(encoded) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed with status {err} for voice {voice!r}")
            pcm = np.concatenate(_chunks) if _chunks else np.zeros(0, np.int16)
            _chunks.clear()
        finally:
            lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)

    if pcm.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {text!r} with voice {voice!r}")
    wave = pcm.astype(np.float32) / 32768.0
    wave = soxr.resample(wave, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return torch.from_numpy(np.clip(wave, -1.0, 1.0))
