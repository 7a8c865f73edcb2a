"""Projector: Whisper hidden states -> audio soft tokens in the GPT's embedding space.

Design choices:
- Downsample first, then map. Whisper emits 50 frames/s; an LM wants far fewer tokens. The default
  stacks k=4 consecutive frames into one vector (12.5 tokens/s) and runs a 2-layer MLP on it
  (the LLaVA / SALMONN-style "stack + MLP"). `conv` (strided Conv1d) and `avg` (average pooling)
  are the two alternatives the layer/projector ablation compares against.
- The output is RMS-normalised per token and multiplied by `target_rms`, the RMS of the text
  embeddings it sits beside. nanochat norms its token embeddings right after lookup, so text
  tokens have RMS 1; audio tokens at a different scale would dominate or vanish in attention.
  `target_rms` is a buffer, measured from the LM once (`set_target_rms`), never trained.
- Frames past a clip's length are zeroed before stacking, so the last (partial) token of a clip
  never sees padding from a longer neighbour in the batch.
- `lego` (LegoSLM, arXiv 2505.11352): the stacked frames map to logits over the LM's vocabulary
  (`vocab`) instead of a vector; omni.model.speech_lm turns them into the posterior-weighted mix of
  the LM's own token embeddings, so every audio token lies where the LM reads words (BOS, the CTC
  blank, included).
- `VoicePool`: a few tokens for the whole clip, beside the frame-by-frame ones: who speaks, how fast,
  how high, in what style. A linear probe reads gender and style from pooled Whisper states at 0.9+,
  and the early states best (the layer ablation), while the content tokens come from the last state
  and spread the voice over a hundred positions that a small LM has to gather; one learned attention
  pooling over a learned mix of every state hands it to the LM in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("stack", "conv", "avg", "lego")


class VoicePool(nn.Module):
    """n soft tokens summarising a clip: a learned softmax mix of every Whisper state, layer-normed,
    attention-pooled over its frames by n learned queries, mapped to the LM's width (a 2-layer MLP)
    and RMS-normed to the text embeddings' scale (`target_rms`, as Projector)."""

    def __init__(self, n_states: int, d_in: int, d_out: int, n: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(n_states))  # zero: a plain average of the states to start
        self.queries = nn.Parameter(torch.randn(n, d_in) / math.sqrt(d_in))
        self.key = nn.Linear(d_in, d_in)
        self.fc1, self.fc2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)
        self.register_buffer("target_rms", torch.tensor(1.0))

    def forward(self, hidden: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        """(B, S, T, d_in) right-padded states and their lengths -> (B, n, d_out)."""
        x = torch.einsum("s,bstd->btd", F.softmax(self.weights, dim=0), hidden)
        x = F.layer_norm(x, x.shape[-1:])
        scores = torch.einsum("nd,btd->bnt", self.queries, self.key(x)) / math.sqrt(x.size(-1))
        pad = torch.arange(x.size(1), device=x.device)[None, :] >= frame_lengths[:, None]
        pooled = scores.masked_fill(pad[:, None, :], float("-inf")).softmax(-1) @ x
        y = self.fc2(F.gelu(self.fc1(pooled)))
        return F.rms_norm(y, (y.size(-1),)) * self.target_rms


@dataclass
class ProjectorConfig:
    d_in: int = 384  # Whisper width (tiny.en 384, base 512, small 768)
    d_out: int = 384  # GPT width (n_embd)
    k: int = 4  # frames per audio token: 50 frames/s / k = audio tokens per second
    kind: str = "stack"  # stack | conv | avg | lego: how k frames become one token (lego: logits over the LM vocabulary, stacked frames)
    hidden: int = 0  # MLP hidden width; 0 means d_out
    vocab: int = 0  # lego only: the LM's vocabulary size (the logits' width)


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        if config.kind not in KINDS:
            raise ValueError(f"projector kind {config.kind!r} is not one of {KINDS} (parameter `projector`)")
        if config.k < 1:
            raise ValueError(f"stacking factor k must be >= 1, got {config.k} (parameter `k`)")
        self.config = config
        c = config
        hidden = c.hidden or c.d_out
        if c.kind == "lego" and c.vocab < 2:
            raise ValueError(f"projector kind 'lego' needs the LM's vocabulary size, got vocab={c.vocab} (parameter `projector`)")
        if c.kind in ("stack", "lego"):
            self.down = None
            self.fc1 = nn.Linear(c.k * c.d_in, hidden)
        elif c.kind == "conv":
            self.down = nn.Conv1d(c.d_in, hidden, kernel_size=c.k, stride=c.k)
            self.fc1 = None
        else:  # avg
            self.down = None
            self.fc1 = nn.Linear(c.d_in, hidden)
        self.fc2 = nn.Linear(hidden, c.vocab if c.kind == "lego" else c.d_out)
        self.register_buffer("target_rms", torch.tensor(1.0))

    @torch.no_grad()
    def set_target_rms(self, value: float | torch.Tensor) -> None:
        self.target_rms.fill_(float(value))

    def token_lengths(self, frame_lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(frame_lengths + self.config.k - 1, self.config.k, rounding_mode="floor")

    def forward(self, x: torch.Tensor, frame_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, d_in) right-padded frames -> (tokens (B, ceil(T/k), d_out), token_lengths (B,));
        for `lego`, logits (B, ceil(T/k), vocab) instead of tokens."""
        B, T, D = x.shape
        k = self.config.k
        if frame_lengths is None:
            frame_lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        valid = torch.arange(T, device=x.device)[None, :] < frame_lengths[:, None]
        x = x * valid[..., None].to(x.dtype)
        n_tok = math.ceil(T / k)
        x = F.pad(x, (0, 0, 0, n_tok * k - T))  # zero frames so T is a multiple of k
        kind = self.config.kind
        if kind in ("stack", "lego"):
            h = self.fc1(x.reshape(B, n_tok, k * D))
        elif kind == "conv":
            h = self.down(x.transpose(1, 2)).transpose(1, 2)
        else:
            # mean over the valid frames of each group, so a partial last group is not diluted
            counts = F.pad(valid, (0, n_tok * k - T)).reshape(B, n_tok, k).sum(-1, keepdim=True).clamp(min=1)
            h = self.fc1(x.reshape(B, n_tok, k, D).sum(2) / counts)
        y = self.fc2(F.gelu(h))
        if kind == "lego":
            return y, self.token_lengths(frame_lengths)
        y = F.rms_norm(y, (y.size(-1),)) * self.target_rms
        return y, self.token_lengths(frame_lengths)
