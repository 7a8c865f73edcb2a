"""omni.data.tts: espeak-ng through ctypes, offline and deterministic; word timing (espeak events, letter counts)."""

import multiprocessing as mp

import numpy as np

import pytest
import torch

from omni.data import tts

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


# --- word timing ----------------------------------------------------------------------------


def test_chars_word_times_are_proportional_to_letters_plus_pauses():
    # "ab" weighs 2 letters + 1 per word = 3; "cd-e." weighs 3 letters + 1 + 3 (pause after ".") = 7
    spans = tts.chars_word_times("ab cd-e.", 1.0, 3.0)
    assert np.allclose(spans, [(1.0, 1.6), (1.6, 3.0)])
    assert tts.chars_word_times("", 0.0, 1.0) == []


def test_token_words_and_agreement():
    spans = [(0.0, 0.2), (0.2, 0.5)]
    # token centres 0.05 0.15 0.25 0.35 0.45 0.55
    assert tts.token_words(spans, 6, 0.1).tolist() == [0, 0, 1, 1, 1, -1]
    same = tts.word_timing_agreement(spans, spans, 6, 0.1)
    assert same == {"token_agreement": 1.0, "onset_error_mean": 0.0, "onset_error_median": 0.0}
    late = tts.word_timing_agreement([(0.0, 0.3), (0.3, 0.5)], spans, 6, 0.1)  # the token at 0.25 moves to word 0
    assert late["token_agreement"] == pytest.approx(4 / 5)
    assert late["onset_error_mean"] == pytest.approx(0.05)


def test_espeak_word_times_describe_the_synthesized_clip():
    text, voice = "Stop here, then go on - slowly.", "en-gb+m3"
    spans, total = tts.word_times(text, voice, rate=160, pitch=40, pitch_range=60)
    wave = tts.synthesize(text, voice=voice, rate=160, pitch=40, pitch_range=60)
    assert total == pytest.approx(wave.numel() / tts.SAMPLE_RATE, abs=1e-3)  # the same utterance
    assert len(spans) == 7  # one span per whitespace word
    onsets = [a for a, _ in spans]
    assert onsets == sorted(onsets) and spans[0][0] == 0.0 and spans[-1][1] <= total
    assert spans[5][0] == spans[5][1] and spans[6][1] > spans[6][0]  # the lone "-" is not spoken; "slowly." is
    # the audio in the middle of a word is louder than the audio in the pause after "here,"
    w = wave.numpy()
    sr = tts.SAMPLE_RATE
    mid = spans[0][0] + 0.5 * (spans[0][1] - spans[0][0])
    loud = np.sqrt(np.mean(w[int((mid - 0.05) * sr) : int((mid + 0.05) * sr)] ** 2))
    pause = np.sqrt(np.mean(w[int((spans[2][0] - 0.06) * sr) : int((spans[2][0] - 0.01) * sr)] ** 2))
    assert loud > 5 * pause
