"""Audio in and out, and the checks that keep a bad clip out of a batch. (The log-mel that Whisper
reads is omni.model.mel: the encoder's front-end.)

Design choices:
- No torchaudio (no CPU build; when installed it breaks transformers' Whisper import here). Files are
  read and written with soundfile and resampled with soxr (HQ, deterministic).
- Everything downstream sees float32 1-D mono at 16 kHz: `load` downmixes by averaging channels
  and resamples, then `validate` rejects what would silently poison a batch or stop a job midway:
  no samples, NaN/inf, silence, too short for the encoder, or more than `max_seconds` (Whisper sees
  at most 30 s; longer audio must be chunked). `problem`/`check_file` return the same reasons as
  strings, so a manifest reader can collect them all (with file:line) before any work starts.
- Silence means RMS < SILENCE_RMS = 1e-4 (-80 dBFS, about 3 LSB of 16-bit PCM) over the whole clip:
  digital silence and dither-only files (+-2 LSB is -87 dBFS), while the quietest real recordings
  pass (speech sits around -20..-40 dBFS RMS; a 0.5 s word at -30 dBFS in 30 s of silence is still
  -48 dBFS). RMS <= peak, so every clip with peak < 1e-4 is silent too. A threshold on RMS rather
  than peak also catches a dither-only file with one stray louder sample.
- Too short means fewer than MIN_SAMPLES = N_FFT // 2 + 1 = 201 samples at 16 kHz (12.6 ms): the
  log-mel reflect-pads N_FFT // 2 samples on each side, which needs more samples than that, and
  then gives N // HOP_LENGTH >= 1 frame, which Whisper's conv stack (kernel 3, padding 1, the second
  with stride 2) turns into >= 1 encoder frame. In mode var 201 samples encode and 200 fail
  (tests/test_audio.py); pad30 would take 160, but one limit for both keeps a manifest's verdict
  independent of the mode.
- A WAV cut short inside its data chunk (a copy or download that stopped) decodes without an error
  in libsndfile, as a shorter clip. Its header still says how many bytes of samples should follow, so
  `check_header` compares that with what the file holds and calls the clip truncated, with both
  counts in frames: a half clip never passes as a whole one.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from omni.model.mel import MAX_SECONDS, N_FFT, SAMPLE_RATE

SILENCE_RMS = 1e-4  # below this RMS (-80 dBFS) a clip is called silent (see module docstring)
MIN_SAMPLES = N_FFT // 2 + 1  # 201 at 16 kHz: the shortest clip log_mel + the encoder take (docstring)


class AudioError(ValueError):
    """Bad audio input; the message always names the file (or the caller's name for the clip)."""

    def __init__(self, name: str, reason: str | None = None):
        # AudioError(name, reason); AudioError(message) when the caller has put the name in already
        self.name, self.reason = (name, reason) if reason is not None else (None, name)
        super().__init__(f"{name}: {reason}" if reason is not None else name)


def _length_problem(n: int, max_seconds: float | None) -> str | None:
    if n < MIN_SAMPLES:
        return (f"too short: {n} samples ({1000 * n / SAMPLE_RATE:.1f} ms) at 16 kHz; "
                f"Whisper's log-mel and conv stack need at least {MIN_SAMPLES} ({1000 * MIN_SAMPLES / SAMPLE_RATE:.1f} ms)")
    if max_seconds is not None and n / SAMPLE_RATE > max_seconds:
        return f"{n / SAMPLE_RATE:.2f} s is longer than max_seconds={max_seconds:g} (chunk it first)"
    return None


def problem(wave: torch.Tensor, max_seconds: float | None = MAX_SECONDS) -> str | None:
    """Why a 1-D float 16 kHz clip cannot be encoded (empty, NaN/inf, silent, too short, too long), or None."""
    n = wave.numel()
    if n == 0:
        return "empty audio (no samples)"
    finite = torch.isfinite(wave)
    if not finite.all():
        return f"{int((~finite).sum())} NaN/inf samples"
    rms = float(wave.double().pow(2).mean().sqrt())
    if rms < SILENCE_RMS:
        return f"silent audio (RMS {rms:.2e} < {SILENCE_RMS:.0e}, -80 dBFS)"
    return _length_problem(n, max_seconds)


def validate(wave: torch.Tensor | np.ndarray, name: str, max_seconds: float | None = MAX_SECONDS) -> torch.Tensor:
    """Check an in-memory 16 kHz mono clip; returns it as contiguous float32 1-D torch tensor.

    Raises AudioError naming `name` if it is not 1-D or `problem` finds a reason (None: no limit).
    """
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(np.ascontiguousarray(wave))
    if not isinstance(wave, torch.Tensor):
        raise AudioError(name, f"expected a torch.Tensor or numpy array, got {type(wave).__name__}")
    if wave.dim() != 1:
        raise AudioError(name, f"expected a 1-D mono waveform, got shape {tuple(wave.shape)} (downmix first)")
    wave = wave.detach().to("cpu", torch.float32).contiguous()
    reason = problem(wave, max_seconds)
    if reason:
        raise AudioError(name, reason)
    return wave


def _sf_error(e: Exception) -> str:
    # libsndfile's own words, without its "Error opening <file>:" (the caller names the file)
    return str(getattr(e, "error_string", None) or e)


def check_header(
    path: str | Path, max_seconds: float | None = MAX_SECONDS, data: bytes | None = None
) -> tuple[float | None, str | None]:
    """(seconds, reason or None) from the file's header only (cheap: nothing is decoded): missing,
    unreadable header, a WAV cut short (wav_truncation), no samples, too short (exact at 16 kHz, else
    estimated), too long.
    `data`: the file's bytes when the caller has read them already; `path` then only names it."""
    path = Path(path)
    if data is None and not path.is_file():
        return None, "audio file not found" if not path.exists() else "not a file"
    try:
        info = sf.info(io.BytesIO(data) if data is not None else str(path))
    except Exception as e:  # libsndfile: unknown format, truncated header, ...
        return None, f"unreadable audio ({_sf_error(e)})"
    seconds = info.frames / info.samplerate if info.samplerate > 0 else 0.0
    if info.format == "WAV":
        with io.BytesIO(data) if data is not None else open(path, "rb") as f:
            cut = wav_truncation(f)
        if cut:
            return seconds, cut
    if info.frames <= 0:
        return seconds, "empty audio (no samples)"
    return seconds, _length_problem(round(seconds * SAMPLE_RATE), max_seconds)  # samples at 16 kHz


def wav_truncation(f) -> str | None:
    """"truncated: ..." when a RIFF/WAVE file (binary file object) holds fewer bytes of samples than its
    data chunk declares, else None. Walks the chunk headers only. A data size of 0 or 0xFFFFFFFF
    (written by a streaming recorder that never knew the length) declares nothing and passes."""
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None  # RIFX, RF64, ...: left to libsndfile
    block_align = sample_rate = 0
    pos = 12
    while pos + 8 <= size:
        f.seek(pos)
        chunk, length = struct.unpack("<4sI", f.read(8))
        if chunk == b"fmt ":
            _, _, sample_rate, _, block_align = struct.unpack("<HHIIH", f.read(14))
        elif chunk == b"data":
            present = size - (pos + 8)
            if length in (0, 0xFFFFFFFF) or present >= length or block_align <= 0 or sample_rate <= 0:
                return None
            promised, held = length // block_align, present // block_align
            return (f"truncated: the header promises {promised} frames ({promised / sample_rate:.2f} s), "
                    f"the file holds {held} ({held / sample_rate:.2f} s)")
        pos += 8 + length + (length & 1)  # chunks are padded to an even size
    return None


def load(path: str | Path, max_seconds: float | None = MAX_SECONDS, data: bytes | None = None) -> torch.Tensor:
    """Read any soundfile-readable file (wav, flac, ogg, mp3, ...) as float32 1-D mono at 16 kHz,
    checked by `validate`. The header is checked first, so a huge file is refused before decoding.
    `data`: the file's bytes when the caller has read them already (e.g. to hash them)."""
    _, reason = check_header(path, max_seconds, data)
    if reason:
        raise AudioError(str(path), reason)
    try:
        samples, sr = sf.read(io.BytesIO(data) if data is not None else str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports corrupt data as LibsndfileError/RuntimeError
        raise AudioError(str(path), f"unreadable audio ({_sf_error(e)})") from e
    if samples.size == 0:
        raise AudioError(str(path), "empty audio (no samples)")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    wave = resample(torch.from_numpy(np.ascontiguousarray(mono)), sr, SAMPLE_RATE)
    return validate(wave, str(path), max_seconds)


def check_file(path: str | Path, max_seconds: float | None = MAX_SECONDS, data: bytes | None = None) -> str | None:
    """Why `path` cannot be encoded (missing, undecodable, empty, NaN/inf, silent, too short, too
    long), or None: `load` without keeping the samples. Decodes the whole file (NaN and silence are
    only seen in the samples); benchmarks/bench_checks.py measures what that costs next to encoding."""
    try:
        load(path, max_seconds, data)
    except AudioError as e:
        return e.reason
    return None


def save(path: str | Path, wave: torch.Tensor | np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """Write a 1-D clip as 16-bit PCM wav (values clipped to [-1, 1]); creates parent folders."""
    path = Path(path)
    x = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    if x.ndim != 1:
        raise AudioError(str(path), f"save expects a 1-D waveform, got shape {x.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(x.astype(np.float32), -1.0, 1.0), sr, subtype="PCM_16", format="WAV")


def resample(wave: torch.Tensor | np.ndarray, sr_in: int, sr_out: int) -> torch.Tensor:
    """Resample a 1-D clip with soxr (high quality); float32 tensor out."""
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got sr_in={sr_in}, sr_out={sr_out}")
    x = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if sr_in != sr_out and x.size > 0:
        x = soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x))
