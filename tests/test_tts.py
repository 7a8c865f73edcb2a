"""omni.tts: espeak-ng through ctypes, offline and deterministic."""

import multiprocessing as mp

import pytest
import torch

from omni import tts

TEXT = "She sells seashells by the sea shore every summer morning."


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    return tts.synthesize(TEXT)


def test_sentence_is_seconds_of_audible_speech(speech):
    assert speech.dtype == torch.float32 and speech.dim() == 1
    seconds = speech.numel() / tts.SAMPLE_RATE
    assert 1.0 <= seconds <= 6.0, seconds
    assert 0.05 < float(speech.abs().max()) <= 1.0
    # speech, not a click: a good share of 20 ms frames carry energy
    frames = speech[: speech.numel() // 320 * 320].view(-1, 320)
    assert (frames.pow(2).mean(1).sqrt() > 0.01).float().mean() > 0.5


@pytest.mark.parametrize("voice", ["en-us", "en-us+whisper", "en-gb-scotland+klatt", "en-gb+m2"])
def test_deterministic(voice):
    # espeak-ng keeps state between utterances and adds random breath noise; tts must hide both
    a = tts.synthesize("Hello there, this is a test.", voice)
    b = tts.synthesize("Hello there, this is a test.", voice)
    assert torch.equal(a, b)


def test_params_change_audio(speech):
    higher = tts.synthesize(TEXT, pitch=80)
    faster = tts.synthesize(TEXT, rate=260)
    assert higher.shape != speech.shape or not torch.equal(higher, speech)
    assert faster.numel() < 0.85 * speech.numel()


def test_voices_differ_and_list():
    english = tts.list_english_voices()
    assert {"en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029"} <= set(english)
    assert all(v.startswith("en") for v in english)
    variants = tts.list_variants()
    assert {"f3", "m2", "klatt", "whisper"} <= set(variants)
    a = tts.synthesize("Good morning.", "en-us+f3")
    b = tts.synthesize("Good morning.", "en-gb")
    assert a.shape != b.shape or not torch.equal(a, b)


@pytest.mark.parametrize("voice", ["xx-nope", "en-us+nonexistent", ""])
def test_unknown_voice(voice):
    with pytest.raises(ValueError, match="voice"):
        tts.synthesize("hello", voice)


@pytest.mark.parametrize("kwargs", [{"rate": 10}, {"pitch": 100}, {"pitch_range": -1}, {"text": "  "}])
def test_bad_params(kwargs):
    args = {"text": "hello"} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        tts.synthesize(**args)


def _synth_len(text: str) -> int:
    return tts.synthesize(text).numel()


def test_worker_processes(speech):
    # the parent has already used the library (fixture): forked children must still work, identically
    with mp.get_context("fork").Pool(2) as pool:
        lengths = pool.map(_synth_len, [TEXT, TEXT])
    assert lengths == [speech.numel(), speech.numel()]
