"""Audio in and out, checks, and a Whisper-compatible log-mel spectrogram in torch.

Design choices:
- No torchaudio (no CPU build; when installed it breaks transformers' Whisper import here). Files are
  read and written with soundfile, resampled with soxr (HQ, deterministic), the STFT is torch.stft.
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
- log_mel reproduces transformers' WhisperFeatureExtractor (periodic Hann window, n_fft 400,
  hop 160, reflect-centred STFT, power spectrum, slaney mel filterbank, log10 floored at 1e-10,
  last STFT frame dropped, clamp at max - 8, then (x + 4) / 4), but per clip: without pad30 each
  clip keeps its own length (N // HOP_LENGTH frames) and its clamp/scale use only its own frames,
  so its mel does not depend on what else is in the batch. With pad30 each clip is zero-padded to
  30 s first, exactly as the feature extractor does, and the max is taken over all 3000 frames.
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
MAX_SECONDS = 30.0
N_SAMPLES_30S = int(MAX_SECONDS * SAMPLE_RATE)  # 480000: Whisper's fixed input
N_FRAMES_30S = N_SAMPLES_30S // HOP_LENGTH  # 3000
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
    unreadable header, no samples, too short (exact at 16 kHz, else estimated), too long.
    `data`: the file's bytes when the caller has read them already; `path` then only names it."""
    path = Path(path)
    if data is None and not path.is_file():
        return None, "audio file not found" if not path.exists() else "not a file"
    try:
        info = sf.info(io.BytesIO(data) if data is not None else str(path))
    except Exception as e:  # libsndfile: unknown format, truncated header, ...
        return None, f"unreadable audio ({_sf_error(e)})"
    seconds = info.frames / info.samplerate if info.samplerate > 0 else 0.0
    if info.frames <= 0:
        return seconds, "empty audio (no samples)"
    return seconds, _length_problem(round(seconds * SAMPLE_RATE), max_seconds)  # samples at 16 kHz


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


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's auditory toolbox scale (librosa htk=False): linear below 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    mel[log_region] = 15.0 + np.log(f[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mel


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f = 200.0 * m / 3.0
    log_region = m >= 15.0
    f[log_region] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (m[log_region] - 15.0))
    return f


@functools.cache
def mel_filters(n_mels: int = 80) -> torch.Tensor:
    """(n_mels, N_FFT // 2 + 1) slaney-normalised triangular filters, 0-8 kHz (= librosa.filters.mel)."""
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([SAMPLE_RATE / 2]))[0], n_mels + 2))
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]  # (n_freq, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    fb *= 2.0 / (edges[2:] - edges[:-2])[None, :]  # slaney: each filter has unit area
    return torch.from_numpy(fb.T.astype(np.float32))


def _as_list(waves: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(waves, torch.Tensor):
        if waves.dim() == 1:
            return [waves]
        if waves.dim() == 2:
            return list(waves)
        raise ValueError(f"waves must be 1-D, 2-D (B, N) or a list of 1-D tensors, got shape {tuple(waves.shape)}")
    out = []
    for i, w in enumerate(waves):
        w = torch.as_tensor(w)
        if w.dim() != 1:
            raise ValueError(f"waves[{i}] must be 1-D, got shape {tuple(w.shape)}")
        out.append(w)
    if not out:
        raise ValueError("waves is empty")
    return out


def log_mel(waves: torch.Tensor | list[torch.Tensor], n_mels: int = 80, pad30: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Whisper log-mel. Returns (mel (B, n_mels, T), mel_lengths (B,) long).

    mel_lengths[i] = N_i // HOP_LENGTH, the frames that carry clip i's audio. Without pad30,
    T = max of those and frames past a clip's length are 0. With pad30, T = 3000 for every clip
    (frames past its audio hold the padded-silence values, exactly as WhisperFeatureExtractor).
    """
    clips = [w.detach().to("cpu", torch.float32) for w in _as_list(waves)]
    n = torch.tensor([w.numel() for w in clips], dtype=torch.long)
    lengths = n // HOP_LENGTH
    window = torch.hann_window(N_FFT)  # periodic, as the feature extractor
    if pad30:
        for i, w in enumerate(clips):
            if w.numel() > N_SAMPLES_30S:
                raise ValueError(f"waves[{i}] is {w.numel() / SAMPLE_RATE:.2f} s; pad30 takes at most 30 s (chunk it first)")
        x = torch.stack([F.pad(w, (0, N_SAMPLES_30S - w.numel())) for w in clips])
        spec = torch.stft(x, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
        valid = torch.ones(len(clips), N_FRAMES_30S, dtype=torch.bool)  # clamp over all 3000, like HF
    else:
        for i, w in enumerate(clips):
            if w.numel() <= N_FFT // 2:
                raise ValueError(f"waves[{i}] has {w.numel()} samples; log_mel needs more than {N_FFT // 2}")
        # Reflect-pad each clip on its own (what center=True does), then zero-pad to a common length
        # and run one uncentred STFT: a clip's frames never see another clip's padding.
        half = N_FFT // 2
        padded = [F.pad(w[None, None], (half, half), mode="reflect")[0, 0] for w in clips]
        longest = max(p.numel() for p in padded)
        x = torch.stack([F.pad(p, (0, longest - p.numel())) for p in padded])
        spec = torch.stft(x, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
        valid = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    power = (spec[..., :-1].abs() ** 2).contiguous()  # Whisper drops the last frame
    mel = (mel_filters(n_mels) @ power).clamp(min=1e-10).log10()  # (B, n_mels, T)
    mel = mel[..., : valid.shape[1]]
    mask = valid[:, None, :]
    peak = mel.masked_fill(~mask, -math.inf).amax(dim=(1, 2), keepdim=True)
    mel = (torch.maximum(mel, peak - 8.0) + 4.0) / 4.0
    if not pad30:
        mel = mel.masked_fill(~mask, 0.0)
    return mel, lengths
