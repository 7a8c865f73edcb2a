import pytest
import torch

from omni.model.encoder import collate_states
from omni.model.projector import Projector, ProjectorConfig
from omni.model.speech_lm import left_pad


@pytest.mark.parametrize("kind", ["stack", "conv", "avg"])
@pytest.mark.parametrize("k", [1, 4, 5])
def test_shapes_lengths_and_scale(kind, k):
    torch.manual_seed(0)
    p = Projector(ProjectorConfig(d_in=16, d_out=24, k=k, kind=kind))
    p.set_target_rms(0.7)
    x = torch.randn(3, 21, 16)
    y, n = p(x, torch.tensor([21, 10, 3]))
    assert y.shape == (3, -(-21 // k), 24)
    assert n.tolist() == [-(-21 // k), -(-10 // k), -(-3 // k)]
    # every token sits at the text-embedding scale
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.full(y.shape[:2], 0.7), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["stack", "conv", "avg"])
def test_padding_does_not_leak_into_a_clip(kind):
    torch.manual_seed(0)
    p = Projector(ProjectorConfig(d_in=8, d_out=8, k=4, kind=kind))
    clip = torch.randn(1, 10, 8)
    alone, _ = p(clip, torch.tensor([10]))
    padded = torch.cat([clip, 100 * torch.randn(1, 7, 8)], dim=1)  # garbage after the clip's end
    batched, n = p(padded, torch.tensor([10]))
    torch.testing.assert_close(batched[:, : n[0]], alone)


def test_bad_kind_and_k_name_the_parameter():
    with pytest.raises(ValueError, match="projector"):
        Projector(ProjectorConfig(kind="transformer"))
    with pytest.raises(ValueError, match="`k`"):
        Projector(ProjectorConfig(k=0))


def test_left_pad_moves_padding_to_the_front():
    x = torch.arange(2 * 4 * 1, dtype=torch.float).reshape(2, 4, 1) + 1
    out, mask = left_pad(x, torch.tensor([4, 2]))
    assert out[0, :, 0].tolist() == [1, 2, 3, 4]
    assert out[1, :, 0].tolist() == [0, 0, 5, 6]
    assert mask.tolist() == [[True] * 4, [False, False, True, True]]


def test_collate_states_pads_right():
    a, b = torch.ones(3, 5, 2), 2 * torch.ones(3, 2, 2)
    h, n = collate_states([a, b])
    assert h.shape == (2, 3, 5, 2) and n.tolist() == [5, 2]
    assert h[1, :, 2:].abs().sum() == 0 and (h[1, :, :2] == 2).all()


def test_lego_tokens_are_posterior_mixes_of_the_lm_embeddings():
    """LegoSLM: the projector's logits over the LM vocabulary, softmaxed, weight the LM's own token
    embeddings; the CTC readout reads those logits; a lego projector without a vocabulary is refused."""
    from omni.model.gpt import GPT, GPTConfig
    from omni.model.losses import ctc_embedding_loss
    from omni.model.speech_lm import SpeechLM, SpeechLMConfig
    from omni.model.tokenizer import ByteTokenizer

    with pytest.raises(ValueError, match="vocab"):
        Projector(ProjectorConfig(d_in=8, d_out=8, k=2, kind="lego"))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=64, vocab_size=257, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model = SpeechLM(gpt, ByteTokenizer(), n_states=2, d_whisper=8, config=SpeechLMConfig(layer="last", k=2, projector="lego"))
    hidden, lengths = torch.randn(2, 2, 9, 8), torch.tensor([9, 4])
    logits, n = model.audio_logits(hidden, lengths)
    tokens, n2 = model.audio_tokens(hidden, lengths)
    assert logits.shape == (2, 5, 257) and n.tolist() == n2.tolist() == [5, 2]
    torch.testing.assert_close(tokens, logits.softmax(-1) @ model.embedding_table())
    # a token whose posterior is one-hot is exactly that word's embedding, where the LM reads it
    with torch.no_grad():
        model.projector.fc2.weight.zero_()
        model.projector.fc2.bias.fill_(-1e4)
        model.projector.fc2.bias[ord("a")] = 1e4
    tokens, _ = model.audio_tokens(hidden, lengths)
    torch.testing.assert_close(tokens[0, 0], gpt.embed(torch.tensor([[ord("a")]]))[0, 0])
    assert torch.isfinite(ctc_embedding_loss(model, hidden, lengths, ["ab", "c"]))


def test_ctc_collapse_keeps_one_mean_token_per_segment_and_drops_blanks():
    from omni.model.speech_lm import ctc_collapse

    blank = 0
    x = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    ids = torch.tensor([[0, 5, 5, 0, 7, 5], [0, 0, 3, 9, 9, 9]])  # row 1 is 4 long: the 9s past its end are padding
    out, n = ctc_collapse(x, ids, torch.tensor([6, 4]), blank)
    assert n.tolist() == [3, 2] and out.shape == (2, 3, 2)
    torch.testing.assert_close(out[0], torch.stack([x[0, 1:3].mean(0), x[0, 4], x[0, 5]]))  # 5 5 | 7 | 5: a repeat after a change is a new segment
    torch.testing.assert_close(out[1, :2], torch.stack([x[1, 2], x[1, 3]]))
    # a clip that is all blank keeps one token (the mean), so the LM still gets a prefix
    out, n = ctc_collapse(x[:1, :3], torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]), blank)
    assert n.tolist() == [1]
    torch.testing.assert_close(out[0, 0], x[0, :3].mean(0))
    # gradients reach every frame of a kept segment and none of a dropped blank
    g = x.clone().requires_grad_()
    ctc_collapse(g, ids, torch.tensor([6, 4]), blank)[0].sum().backward()
    assert g.grad[0, 0].abs().sum() == 0 and (g.grad[0, 1:3] == 0.5).all() and (g.grad[0, 4] == 1).all()


def test_collapsed_lego_prefix_is_bos_then_the_words_embeddings():
    """With collapse and audio_bos, a lego projector that spells 'ab' (each letter over two frames,
    blanks around) gives the LM exactly [BOS 'a' 'b'] as embeddings: the copy test's layout."""
    from omni.model.gpt import GPT, GPTConfig
    from omni.model.speech_lm import SpeechLM, SpeechLMConfig
    from omni.model.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    gpt = GPT(GPTConfig(sequence_len=64, vocab_size=257, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    cfg = SpeechLMConfig(layer="last", k=1, projector="lego", collapse=True, audio_bos=True)
    model = SpeechLM(gpt, tok, n_states=1, d_whisper=8, config=cfg)
    spelled = torch.tensor([tok.bos_id, ord("a"), ord("a"), tok.bos_id, ord("b"), ord("b"), tok.bos_id])
    # a projector sure of each frame: its logits one-hot on the spelled ids
    model.projector.forward = lambda x, n: (torch.nn.functional.one_hot(spelled, 257)[None].float() * 1e4, n)
    hidden = torch.randn(1, 1, len(spelled), 8)
    prefix, mask = model.prefix(hidden, torch.tensor([len(spelled)]))
    want = gpt.embed(torch.tensor([[tok.bos_id, ord("a"), ord("b")]]))
    assert mask.tolist() == [[True] * 3]
    torch.testing.assert_close(prefix, want, atol=1e-3, rtol=0)


def test_voice_tokens_come_first_ignore_padding_and_round_trip(tmp_path):
    """VoicePool: n tokens per clip before the content tokens, at the text scale, the same for a clip
    alone and padded in a batch, saved and loaded with the audio path; they read every Whisper state."""
    from omni.model.gpt import GPT, GPTConfig
    from omni.model.speech_lm import SpeechLM, SpeechLMConfig
    from omni.model.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=64, vocab_size=257, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model = SpeechLM(gpt, ByteTokenizer(), n_states=3, d_whisper=8, config=SpeechLMConfig(layer="last", k=2, voice_tokens=2))
    assert model.states_read() is None and model.select.states_read() == [2]
    hidden, lengths = torch.randn(2, 3, 9, 8), torch.tensor([9, 4])
    tokens, n = model.audio_tokens(hidden, lengths)
    plain = SpeechLM(gpt, ByteTokenizer(), n_states=3, d_whisper=8, config=SpeechLMConfig(layer="last", k=2))
    plain.projector.load_state_dict(model.projector.state_dict())
    content, m = plain.audio_tokens(hidden, lengths)
    assert n.tolist() == (m + 2).tolist() == [7, 4]
    torch.testing.assert_close(tokens[:, 2:], content)  # the words follow the voice, unchanged
    alone, _ = model.audio_tokens(hidden[1:, :, :4], lengths[1:])
    torch.testing.assert_close(tokens[1, :4], alone[0])  # padding frames change nothing
    rms = tokens[:, :2].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, float(model.projector.target_rms)), rtol=1e-4, atol=1e-4)
    model.save_audio_path(tmp_path)
    again = SpeechLM(gpt, ByteTokenizer(), n_states=3, d_whisper=8, config=SpeechLMConfig(layer="last", k=2, voice_tokens=2))
    again.load_audio_path(tmp_path)
    torch.testing.assert_close(again.audio_tokens(hidden, lengths)[0], tokens)
