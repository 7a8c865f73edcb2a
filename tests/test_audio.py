"""omni.data.audio: loading, checks and the Whisper-compatible log-mel."""

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import write_bad_clips
from omni.data import audio, tts
from omni.model.mel import HOP_LENGTH, log_mel, mel_filters, N_SAMPLES_30S


@pytest.fixture(scope="module")
def speech() -> list[torch.Tensor]:
    return [
        tts.synthesize("She sells seashells by the sea shore every summer morning."),
        tts.synthesize("Hello world, how are you today?", "en-gb+f3"),
    ]


def test_log_mel_pad30_matches_feature_extractor(speech):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    ref = fe([w.numpy() for w in speech], sampling_rate=audio.SAMPLE_RATE, return_tensors="np").input_features
    mel, lengths = log_mel(speech, pad30=True)
    assert mel.shape == (2, 80, 3000) and ref.shape == (2, 80, 3000)
    assert np.abs(mel.numpy() - ref).max() <= 1e-3
    assert lengths.tolist() == [w.numel() // HOP_LENGTH for w in speech]
    assert torch.allclose(mel_filters(80), torch.from_numpy(fe.mel_filters.T).float(), atol=1e-6)


def test_log_mel_var_matches_padded_away_from_end(speech):
    padded, _ = log_mel(speech, pad30=True)
    mel, lengths = log_mel(speech)
    assert mel.shape == (2, 80, int(lengths.max())) and lengths.dtype == torch.long
    for i, n in enumerate(lengths.tolist()):
        # the last 2 frames see reflect padding unpadded vs zeros padded: allowed to differ
        assert (mel[i, :, : n - 2] - padded[i, :, : n - 2]).abs().max() < 1e-4
        assert (mel[i, :, n:] == 0).all()


def test_log_mel_does_not_depend_on_batch(speech):
    both, _ = log_mel(speech)
    alone, n = log_mel(speech[1])
    assert alone.shape == (1, 80, int(n[0]))
    assert torch.equal(alone[0], both[1, :, : int(n[0])])
    # a loud neighbour must not change the clamp of a quiet clip
    loud, _ = log_mel([speech[1] * 0.01, speech[0]])
    quiet, _ = log_mel([speech[1] * 0.01])
    assert torch.allclose(loud[0, :, : quiet.shape[2]], quiet[0], atol=1e-6)


def test_log_mel_128_and_frame_count():
    wave = torch.sin(torch.arange(16000 * 2 + 77) * 0.05)
    mel, n = log_mel(wave, n_mels=128)
    assert mel.shape == (1, 128, (16000 * 2 + 77) // 160) and n.tolist() == [mel.shape[2]]
    with pytest.raises(ValueError, match="30 s"):
        log_mel(torch.ones(N_SAMPLES_30S + 1), pad30=True)


def test_save_load_roundtrip(tmp_path, speech):
    path = tmp_path / "sub" / "a.wav"
    audio.save(path, speech[0])
    assert sf.info(str(path)).subtype == "PCM_16"
    back = audio.load(path)
    assert back.dtype == torch.float32 and back.shape == speech[0].shape
    assert (back - speech[0]).abs().max() < 1e-4  # 16-bit quantisation


def test_stereo_downmix_and_resample(tmp_path, speech):
    x = audio.resample(speech[0], audio.SAMPLE_RATE, 44100).numpy()
    stereo = np.stack([x, 0.5 * x], axis=1)
    path = tmp_path / "stereo44k.wav"
    sf.write(str(path), stereo, 44100, subtype="FLOAT")
    y = audio.load(path)
    assert abs(y.numel() - speech[0].numel()) <= 2
    n = min(y.numel(), speech[0].numel())
    # mean of (x, x/2) = 0.75 x; soxr round trip is near transparent
    err = (y[:n] - 0.75 * speech[0][:n]).pow(2).mean() / (0.75 * speech[0][:n]).pow(2).mean()
    assert err < 1e-3, float(err)


def _write(path, data, sr=audio.SAMPLE_RATE):
    sf.write(str(path), data, sr, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "file not found"),
        ("corrupt", "unreadable"),
        ("empty", "empty"),
        ("silent", "silent"),
        ("nan", "NaN"),
        ("too_long", "longer than"),
    ],
)
def test_load_errors_name_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.wav"
    if case == "corrupt":
        path.write_bytes(b"RIFF\x00\x01garbage, not a wav file" * 10)
    elif case == "empty":
        _write(path, np.zeros(0, np.float32))
    elif case == "silent":
        _write(path, np.full(16000, 1e-6, np.float32))
    elif case == "nan":
        x = np.full(16000, 0.1, np.float32)
        x[100] = np.nan
        _write(path, x)
    elif case == "too_long":
        _write(path, np.full(16000 * 3, 0.1, np.float32))
    with pytest.raises(audio.AudioError, match=message) as err:
        audio.load(path, max_seconds=2.0)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_validate_in_memory():
    ok = audio.validate(np.full(1600, 0.5, np.float64), "clip7")
    assert ok.dtype == torch.float32 and ok.numel() == 1600
    for bad, message in [
        (torch.zeros(0), "empty"),
        (torch.zeros(1600), "silent"),
        (torch.tensor([0.1, float("inf")]), "NaN/inf"),
        (torch.full((100,), 0.5), "too short"),
        (torch.ones(2, 100), "1-D"),
        (torch.full((16000 * 31,), 0.1), "longer than"),
    ]:
        with pytest.raises(audio.AudioError, match=message) as err:
            audio.validate(bad, "clip7")
        assert "clip7" in str(err.value)
    assert audio.validate(torch.full((16000 * 31,), 0.1), "long", max_seconds=None).numel() == 16000 * 31


def test_min_samples_is_the_real_minimum_of_log_mel_and_the_encoder():
    """MIN_SAMPLES is what the var forward takes: one sample fewer fails inside log_mel, which is
    why check_file refuses it up front; pad30 (from the same log_mel frames) takes it too."""
    from omni.model.encoder import EncoderConfig, WhisperEncoder

    torch.manual_seed(0)
    enc = WhisperEncoder(EncoderConfig(d_model=32, n_heads=2, n_layers=1, ffn_dim=64)).eval()
    x = torch.randn(audio.MIN_SAMPLES) * 0.1
    for mode in ("var", "pad30"):
        (s,) = enc.encode([x], mode=mode)
        assert s.shape == (2, 1, 32) and torch.isfinite(s).all()
    with pytest.raises((ValueError, RuntimeError)):
        enc.encode([x[:-1]], mode="var")
    assert audio.problem(x) is None and "too short" in audio.problem(x[:-1])


def test_check_file_names_each_bad_kind_and_passes_good_ones(tmp_path):
    for path, reason in write_bad_clips(tmp_path).values():
        got = audio.check_file(path)
        assert got is not None and reason in got, (path, got)
        if path.exists():  # from bytes in memory: the same verdict
            assert audio.check_file(path, data=path.read_bytes()) == got
    audio.save(tmp_path / "ok.wav", 0.1 * np.sin(np.arange(audio.MIN_SAMPLES) * 0.3))
    assert audio.check_file(tmp_path / "ok.wav") is None
    x = np.zeros(8000)
    x[4000] = 0.9
    audio.save(tmp_path / "click.wav", x)
    assert audio.check_file(tmp_path / "click.wav") is None  # RMS -40 dBFS: a click alone is not silence
    # the header alone sees length problems without decoding
    assert "too short" in audio.check_header(tmp_path / "short.wav")[1]
    assert audio.check_header(tmp_path / "nan.wav") == (0.5, None)  # NaN and silence need the samples
    assert audio.check_header(tmp_path / "silent.wav") == (0.5, None)
