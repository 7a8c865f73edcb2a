"""Whisper's front-end: a log-mel spectrogram in torch, batched, per clip.

Design choices:
- No torchaudio (no CPU build; when installed it breaks transformers' Whisper import here): the STFT
  is torch.stft, the mel filterbank is computed here.
- log_mel reproduces transformers' WhisperFeatureExtractor (periodic Hann window, n_fft 400,
  hop 160, reflect-centred STFT, power spectrum, slaney mel filterbank, log10 floored at 1e-10,
  last STFT frame dropped, clamp at max - 8, then (x + 4) / 4), but per clip: without pad30 each
  clip keeps its own length (N // HOP_LENGTH frames) and its clamp/scale use only its own frames,
  so its mel does not depend on what else is in the batch. With pad30 each clip is zero-padded to
  30 s first, exactly as the feature extractor does, and the max is taken over all 3000 frames.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
MAX_SECONDS = 30.0  # Whisper sees at most this much audio at once
N_SAMPLES_30S = int(MAX_SECONDS * SAMPLE_RATE)  # 480000: Whisper's fixed input
N_FRAMES_30S = N_SAMPLES_30S // HOP_LENGTH  # 3000


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
