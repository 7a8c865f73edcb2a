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
