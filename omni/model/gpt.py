"""
A small GPT that can take an audio prefix, in the style of nanochat's gpt.py.

Design choices:
- rotary position embeddings (no learned positions), base 10000
- QK-norm: queries and keys are RMS-normed after rotary, before attention
- ReLU^2 MLP with a 4x hidden width
- parameter-free RMSNorm (F.rms_norm, no learnable weight); pre-norm blocks plus a final norm
- token embeddings are normed right after lookup; `embed` returns exactly that, and an audio
  prefix (soft tokens from the projector) is expected to live at the same scale
- untied lm_head; logits are soft-capped with tanh (cap 15) and returned in float32
- grouped-query attention (n_kv_head <= n_head); no biases anywhere
- nanochat-like init: N(0, 1) embeddings, uniform +-sqrt(3/n_embd) for input projections, and a
  small (not zero) lm_head and residual output projections so a fresh model predicts ~uniform
  (loss ~ ln(vocab)) while gradient still reaches an audio prefix from the first step
- audio prefix: `forward(idx, audio=(B, A, D), audio_mask=(B, A))` runs [audio][text] through the
  transformer; the lm_head only sees text positions, the loss is text-only. A short prefix is padded
  on the LEFT; each sample's positions are shifted by its own padding so its real tokens are numbered
  0, 1, ... exactly as if it were alone, and padded slots are masked out as keys.
- KV cache for generation: prefill [audio][idx] in one pass, then one token at a time; `stream`
  yields each step's tokens (for a server), `generate` collects them.
- nanochat's later architecture, each part a config field that is off by default, so
  an omni LM folder or a ccf4b7f-era nanochat checkpoint computes exactly what it did before:
  `smear` (the previous token's embedding mixed into each position: previous-token information for
  free, which is what an induction head needs first), `lambdas` (per-layer residual and x0 scales),
  `value_embeds` (per-token value embeddings on alternating layers, gated), `backout` (the residual
  after the middle block subtracted before the final norm), `window_pattern` (sliding-window layers),
  `rope_base`, `qk_scale`, `rotary_bf16` (rotary tables rounded to bf16). Audio
  positions are not tokens: they get no value embedding. omni.model.nanochat maps each nanochat period on them.
"""

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from omni.model.kvcache import KVCache
from omni.model.sampling import stream_tokens


@dataclass
class GPTConfig:
    sequence_len: int = 1024  # max total positions (audio prefix + text) in one forward
    vocab_size: int = 257  # 257 = bytes + BOS (ByteTokenizer); a BPE tokenizer gives its own
    n_layer: int = 6  # number of transformer blocks
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head; must divide n_head)
    n_embd: int = 384  # model width; head_dim = n_embd // n_head (must be even for rotary)
    softcap: float = 15.0  # logits = softcap * tanh(logits / softcap); 0 disables
    rope_base: float = 10000.0  # rotary base theta (which nanochat period used which: omni.model.nanochat)
    rotary_bf16: bool = False  # round the rotary cos/sin tables to bf16, as some nanochat periods kept them (omni.model.nanochat)
    qk_scale: float = 1.0  # q and k are each multiplied by this after QK-norm (nanochat today: 1.2)
    smear_keys: bool = False  # per kv head, k_j <- s * k_j + (1 - s) * k_{j-1}, s = sigmoid(learned): a head can match on the previous token (Olsson et al. 2022's smeared keys: induction in one layer). Not nanochat's
    smear: bool = False  # mix the previous position's embedding into each position through a learned gate (nanochat's smear)
    smear_channels: int = 24  # input channels of the smear gate
    lambdas: bool = False  # per-layer scalars: x = resid_lambdas[i] * x + x0_lambdas[i] * x0 before block i
    value_embeds: bool = False  # per-token value embeddings, gated, on layers i with i % 2 == (n_layer - 1) % 2
    ve_gate_channels: int = 12  # input channels of a value-embedding gate (nanochat's periods differ: omni.model.nanochat)
    ve_gate_scale: float = 3.0  # gate = scale * sigmoid(...) (nanochat's periods differ: omni.model.nanochat)
    backout: bool = False  # subtract backout_lambda * (residual after block n_layer // 2) before the final norm
    window_pattern: str = "L"  # per-layer attention span, tiled over layers: L = full, S = short_window; the last layer is always L
    short_window: int = 0  # keys an S layer sees before the query (query included: short_window + 1); 0 = full

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head_dim={self.n_embd // self.n_head} must be even (rotary embeddings)")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(f"window_pattern={self.window_pattern!r} must be a non-empty string of S and L")
        if "S" in self.window_pattern.upper() and self.short_window < 1:
            raise ValueError(f"short_window={self.short_window} must be >= 1 when window_pattern has S layers")
        if self.smear and self.smear_channels > self.n_embd:
            raise ValueError(f"smear_channels={self.smear_channels} exceeds n_embd={self.n_embd}")
        if self.value_embeds and self.ve_gate_channels > self.n_embd:
            raise ValueError(f"ve_gate_channels={self.ve_gate_channels} exceeds n_embd={self.n_embd}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def windows(self) -> list[int]:
        """Per layer, how many keys before the query it sees (the query itself too); 0 = all."""
        pattern = self.window_pattern.upper()
        w = [self.short_window if pattern[i % len(pattern)] == "S" else 0 for i in range(self.n_layer)]
        w[-1] = 0  # as nanochat: the last layer always sees the whole context
        return w

    def has_ve(self, layer: int) -> bool:
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int = 257, head_dim: int = 64, **kw) -> "GPTConfig":
        # nanochat's single knob: width grows with depth (64 per layer); heads are head_dim wide
        width = 64 * depth
        if width % head_dim:
            raise ValueError(f"head_dim={head_dim} must divide the width 64 * depth = {width}")
        n_head = width // head_dim
        shape = dict(n_layer=depth, n_head=n_head, n_kv_head=n_head, n_embd=width)
        return cls(vocab_size=vocab_size, **(shape | kw))


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (B, T, H, hd); cos/sin (B, T, 1, hd/2). Rotate pairs (x1[i], x2[i]) of the two halves.
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_layer = config.n_layer
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_scale = config.qk_scale
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels, self.ve_gate_scale = config.ve_gate_channels, config.ve_gate_scale
        self.ve_gate = nn.Linear(config.ve_gate_channels, self.n_kv_head, bias=False) if config.has_ve(layer_idx) else None
        self.key_smear = nn.Parameter(torch.zeros(self.n_kv_head)) if config.smear_keys else None  # logit of s per kv head
        self.capture: list[Tensor] | None = None  # set by GPT.attention_to: each forward appends its attention weights

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kv_cache: KVCache | None,
                ve: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: the token's own value embedding, gated per kv head
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        # .to: autocast may run rms_norm in float32 (CUDA's list differs from CPU's); SDPA wants one dtype
        q, k = norm(q).to(v.dtype), norm(k).to(v.dtype)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        if self.key_smear is not None:
            k = self._smear_keys(k, kv_cache)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, self.n_layer)
        if self.n_kv_head != self.n_head:
            # repeat rather than SDPA's enable_gqa: works on every torch >= 2.4 and every backend
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.capture is not None:  # GPT.attention_to: the weights SDPA used, written out
            allowed = mask if mask is not None else torch.ones(T, k.size(2), dtype=torch.bool, device=q.device).tril(k.size(2) - T)
            scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
            self.capture.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1))
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


    def _smear_keys(self, k: Tensor, kv_cache: KVCache | None) -> Tensor:
        """k (B, T, H, hd) -> s * k_j + (1 - s) * k_{j-1}; the key before the first position is the cache's
        last one while decoding, else zero."""
        prev = kv_cache.prev_keys.get(self.layer_idx) if kv_cache is not None else None
        if kv_cache is not None:
            kv_cache.prev_keys[self.layer_idx] = k[:, -1:]
        if prev is None:
            prev = torch.zeros_like(k[:, :1])
        s = torch.sigmoid(self.key_smear).to(k.dtype).view(1, 1, -1, 1)
        return s * k + (1 - s) * torch.cat([prev.to(k.dtype), k[:, :-1]], dim=1)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kv_cache: KVCache | None,
                ve: Tensor | None = None) -> Tensor:
        x = x + self.attn(norm(x), cos, sin, mask, kv_cache, ve)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # nanochat's later parts exist only when their field is on, so older state dicts load strictly
        if config.lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(config.smear_channels, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        if config.value_embeds:
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict(
                {str(i): nn.Embedding(config.vocab_size, kv_dim) for i in range(config.n_layer) if config.has_ve(i)})
        # non-persistent: derived from the config, so never saved and never loaded
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build_rotary(config.sequence_len)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        c = self.config
        D = c.n_embd
        s = math.sqrt(3.0 / D)  # uniform with std 1/sqrt(D): unit-RMS inputs give unit-RMS outputs
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        # small rather than zero: the fresh model still predicts ~uniform, but an audio prefix
        # gets a (small) gradient from step one, even through a frozen fresh GPT
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=0.001)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=0.001)
            if block.attn.ve_gate is not None:  # gates start slightly above neutral, as nanochat's
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        # the later parts start as today's nanochat starts them
        L = c.n_layer
        if c.lambdas:  # stronger residual and more of x0 in early layers
            for i in range(L):
                self.resid_lambdas[i] = 1.15 - 0.10 * i / max(L - 1, 1)
                self.x0_lambdas[i] = 0.20 - 0.15 * i / max(L - 1, 1)
        if c.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            nn.init.zeros_(self.smear_lambda)
        if c.backout:
            nn.init.constant_(self.backout_lambda, 0.2)
        if c.value_embeds:
            for emb in self.value_embeds.values():
                nn.init.uniform_(emb.weight, -s, s)

    def _build_rotary(self, seq_len: int) -> None:
        head_dim = self.config.n_embd // self.config.n_head
        device = self.transformer.wte.weight.device
        inv_freq = 1.0 / self.config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        self.cos, self.sin = freqs.cos(), freqs.sin()  # (seq_len, head_dim/2), float32
        if self.config.rotary_bf16:  # nanochat multiplied fp32 activations by bf16 tables, i.e. by these values
            self.cos, self.sin = self.cos.bfloat16().float(), self.sin.bfloat16().float()

    def _rotary(self, pos: Tensor, total: int) -> tuple[Tensor, Tensor]:
        # pos (B, T) long, all < total -> cos, sin (B, T, 1, hd/2). Grows only if sequence_len
        # was raised after init (total never exceeds sequence_len, forward checks).
        if total > self.cos.size(0):
            self._build_rotary(max(total, self.config.sequence_len))
        return self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)

    def embed(self, idx: Tensor) -> Tensor:
        """Token embeddings exactly as the transformer sees them: (B, T) -> (B, T, D), unit RMS."""
        return norm(self.transformer.wte(idx))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        audio: Tensor | None = None,
        audio_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        embeds: Tensor | None = None,
        audio_idx: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) float32 for the text positions, or the mean text loss if targets are given.

        idx (B, T) text tokens; audio (B, A, D) soft tokens prepended before idx; audio_mask (B, A)
        bool, True = real, padding on the left. targets (B, T) aligned with idx, -1 = ignore.
        embeds (B, T, D): the inputs at idx's positions instead of embed(idx), for audio spliced into
        the middle of a text (omni.experiments.tuning); there idx is -1 where a position is not a token (no
        value embedding); logits and loss are computed at every position.
        audio_idx (B, A): token ids at the prefix's positions where the prefix holds text (its value
        embeddings, as the same text in idx would get), -1 where it holds soft tokens; None = all soft.
        With kv_cache, the call appends to the cache (an audio prefix only on the first call).
        """
        c = self.config
        B, T = idx.shape
        if embeds is not None and embeds.shape != (B, T, c.n_embd):
            raise ValueError(f"embeds must be (B={B}, T={T}, n_embd={c.n_embd}), got {tuple(embeds.shape)}")
        x = self.embed(idx) if embeds is None else embeds
        A = 0
        if audio is not None:
            if audio.ndim != 3 or audio.size(0) != B or audio.size(2) != c.n_embd:
                raise ValueError(f"audio must be (B={B}, A, n_embd={c.n_embd}), got {tuple(audio.shape)}")
            A = audio.size(1)
            if audio_mask is not None:
                if audio_mask.shape != audio.shape[:2] or audio_mask.dtype != torch.bool:
                    raise ValueError(
                        f"audio_mask must be bool (B, A)={tuple(audio.shape[:2])}, "
                        f"got {audio_mask.dtype} {tuple(audio_mask.shape)}"
                    )
                if A > 1 and bool((audio_mask[:, :-1] & ~audio_mask[:, 1:]).any()):
                    raise ValueError("audio_mask must be padded on the LEFT (False... then True...)")
                if bool(audio_mask.all()):
                    audio_mask = None  # nothing padded: keep the is_causal fast path
                else:
                    # zero the padded slots so garbage (even NaN) there cannot leak through 0 * v
                    audio = audio.masked_fill(~audio_mask.unsqueeze(-1), 0.0)
            x = torch.cat([audio.to(x.dtype), x], dim=1)
        elif audio_mask is not None:
            raise ValueError("audio_mask given without audio")
        if kv_cache is not None and audio_mask is not None and kv_cache.pos > 0:
            # padded soft tokens set the cache's padding, which only a first call may do; unpadded ones
            # may follow text (a tuned run's voice tokens before "Assistant:", omni.serve.session)
            raise ValueError("a padded audio prefix (audio_mask) can only be given on the first (prefill) call with a kv_cache")

        S = A + T  # new positions in this call
        start = kv_cache.pos if kv_cache is not None else 0
        total = start + S
        if total > c.sequence_len:
            raise ValueError(
                f"total length {total} (audio prefix {A} + text {T}"
                f"{f' + cached {start}' if start else ''}) exceeds sequence_len={c.sequence_len}"
            )
        if kv_cache is not None and total > kv_cache.max_len:
            raise ValueError(f"total length {total} exceeds the kv_cache's max_len={kv_cache.max_len}")

        # per-sample left padding; positions are shifted by it so real tokens count from 0
        if kv_cache is not None and kv_cache.pad is not None:
            pad = kv_cache.pad
        elif audio_mask is not None:
            pad = (~audio_mask).sum(dim=1)
        else:
            pad = torch.zeros(B, dtype=torch.long, device=idx.device)
        q_idx = torch.arange(start, total, device=idx.device)
        pos = (q_idx.unsqueeze(0) - pad.unsqueeze(1)).clamp(min=0)  # padded slots: any valid position
        cos, sin = self._rotary(pos, total)
        masks = self._masks(B, A, start, total, q_idx, audio_mask, kv_cache)
        x = self._smear(x, kv_cache)

        # value embeddings: token ids only at text positions (audio and spliced positions have none)
        ve_idx = torch.cat([torch.full((B, A), -1, dtype=idx.dtype, device=idx.device) if audio_idx is None else audio_idx, idx], dim=1) if A else idx
        ve_real = (ve_idx >= 0).unsqueeze(-1)
        ve_idx = ve_idx.clamp(min=0)
        x0, kept = x, None
        # padded slots stay zero in every layer, so nothing of them reaches a real position through
        # a smeared key (smear_keys) either
        padded = None if audio_mask is None else torch.cat([~audio_mask, torch.zeros(B, T, dtype=torch.bool, device=x.device)], 1).unsqueeze(-1)
        for i, block in enumerate(self.transformer.h):
            if c.lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](ve_idx) * ve_real if c.has_ve(i) else None
            x = block(x, cos, sin, masks[i], kv_cache, ve)
            if padded is not None:
                x = x.masked_fill(padded, 0.0)
            if c.backout and i == c.n_layer // 2:
                kept = x
        if kv_cache is not None:
            kv_cache.pos += S
        if kept is not None:
            x = x - self.backout_lambda.to(x.dtype) * kept

        x = norm(x[:, A:])  # the lm_head never sees audio positions
        logits = self.lm_head(x).float()
        if c.softcap > 0:
            logits = c.softcap * torch.tanh(logits / c.softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    @torch.no_grad()
    def attention_to(self, idx: Tensor, query: Tensor, embeds: Tensor | None = None) -> Tensor:
        """Attention weights (B, n_layer, n_head, T) of the position `query` (B,) of each row over every
        position, from one forward of `idx` (or `embeds`): where a position looks (the listening
        ladder: how much an answer attends to the audio). Computed beside SDPA, for inspection only."""
        blocks = [b.attn for b in self.transformer.h]
        for a in blocks:
            a.capture = []
        try:
            self.forward(idx, embeds=embeds)
            weights = torch.stack([a.capture[0] for a in blocks], dim=1)  # (B, L, H, T, T)
        finally:
            for a in blocks:
                a.capture = None
        rows = torch.arange(idx.size(0), device=idx.device)
        return weights[rows, :, :, query]

    def _smear(self, x: Tensor, kv_cache: KVCache | None) -> Tensor:
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:smear_channels])) * x_{t-1}, on the embeddings
        (audio included); while decoding, x_{t-1} of the first new position comes from the cache."""
        if not self.config.smear:
            return x
        prev = kv_cache.prev_embedding if kv_cache is not None else None
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:]
        before = x[:, :-1] if prev is None else torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        here = x if prev is not None else x[:, 1:]
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(here[..., : self.config.smear_channels]))
        mixed = here + gate * before
        return mixed if prev is not None else torch.cat([x[:, :1], mixed], dim=1)

    def _masks(self, B: int, A: int, start: int, total: int, q_idx: Tensor, audio_mask: Tensor | None,
               kv_cache: KVCache | None) -> list[Tensor | None]:
        """Per layer, the attention mask (B, 1, S, total) bool, or None for SDPA's is_causal fast path
        (no padding, no cache, full window). Updates the cache's key mask."""
        windows = self.config.windows()
        if kv_cache is None and audio_mask is None and not any(windows):
            return [None] * len(windows)
        device = q_idx.device
        key_real = torch.ones(B, total, dtype=torch.bool, device=device)
        if kv_cache is not None:
            if kv_cache.key_mask is None:
                kv_cache.key_mask = torch.ones(B, kv_cache.max_len, dtype=torch.bool, device=device)
                kv_cache.pad = (~audio_mask).sum(dim=1) if audio_mask is not None else torch.zeros(B, dtype=torch.long, device=device)
            if audio_mask is not None:
                kv_cache.key_mask[:, :A] = audio_mask
            key_real = kv_cache.key_mask[:, :total]
        elif audio_mask is not None:
            key_real[:, :A] = audio_mask
        k_idx = torch.arange(total, device=device)
        dist = q_idx.unsqueeze(1) - k_idx.unsqueeze(0)  # (S, total): how far back each key is
        # a query always sees itself: a padded slot would otherwise have no key at all and give NaN
        base = key_real.unsqueeze(1) | (dist == 0)
        out: dict[int, Tensor] = {}
        for w in set(windows):
            seen = (dist >= 0) & (dist <= w) if w else dist >= 0
            out[w] = (seen & base).unsqueeze(1)  # (B, 1, S, total), broadcast over heads
        return [out[w] for w in windows]

    @torch.no_grad()
    def generate(self, idx: Tensor, **kwargs) -> Tensor:
        """New tokens (B, n_new), n_new <= max_new_tokens (stops early once every sample stopped).

        Keyword arguments as `stream` (audio, audio_mask, max_new_tokens, temperature, top_k, top_p,
        stop_token, seed, use_cache): all of its steps, stacked; the one decoding loop lives there.
        """
        steps = list(self.stream(idx, **kwargs))
        return torch.stack(steps, dim=1) if steps else torch.empty(idx.size(0), 0, dtype=torch.long, device=idx.device)

    @torch.no_grad()
    def stream(
        self,
        idx: Tensor,
        audio: Tensor | None = None,
        audio_mask: Tensor | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        audio_idx: Tensor | None = None,
    ) -> Iterator[Tensor]:
        """Yields the next token of every sample, (B,) long, one decoding step at a time.

        temperature 0 is greedy. A sample that emitted stop_token keeps emitting it (padding); the
        steps end once every sample stopped, or after max_new_tokens. use_cache=False recomputes the
        whole sequence each step: slow, the reference for the cache. A generator, so a server can send
        each token as it is made; its checks run at the first next().
        """
        B, T = idx.shape
        if T == 0:
            raise ValueError("generate needs at least one text token in idx (e.g. BOS) to predict from")
        A = 0 if audio is None else audio.size(1)
        if A + T + max_new_tokens - 1 > self.config.sequence_len:
            raise ValueError(
                f"audio prefix {A} + prompt {T} + max_new_tokens {max_new_tokens} - 1 exceeds "
                f"sequence_len={self.config.sequence_len}"
            )
        gen = None
        if seed is not None:
            gen = torch.Generator(device=idx.device)
            gen.manual_seed(seed)

        if use_cache:
            logits, cache = self.prefill(idx, audio, audio_mask, max_new_tokens, audio_idx)
            step = lambda nxt: self.step(nxt, cache)  # noqa: E731
        else:  # the reference for the cache: the whole sequence again at every step
            seq = [idx]

            def step(nxt: Tensor) -> Tensor:
                seq.append(nxt.unsqueeze(1))
                return self.forward(torch.cat(seq, dim=1), audio=audio, audio_mask=audio_mask, audio_idx=audio_idx)[:, -1]

            logits = self.forward(idx, audio=audio, audio_mask=audio_mask, audio_idx=audio_idx)[:, -1]
        yield from stream_tokens(logits, step, max_new_tokens, stop_token, temperature, top_k, top_p, gen)

    @torch.no_grad()
    def prefill(self, idx: Tensor, audio: Tensor | None = None, audio_mask: Tensor | None = None, max_new_tokens: int = 64,
                audio_idx: Tensor | None = None) -> tuple[Tensor, KVCache]:
        """[audio][idx] into a fresh KV cache with room for max_new_tokens more: (the last position's
        logits (B, V), the cache). With `step`, the decoding primitive every search shares (stream's
        greedy and sampled steps, omni.model.beam's beam search)."""
        A = 0 if audio is None else audio.size(1)
        cache = KVCache(idx.size(0), A + idx.size(1) + max_new_tokens)
        return self.forward(idx, audio=audio, audio_mask=audio_mask, kv_cache=cache, audio_idx=audio_idx)[:, -1], cache

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache with room for max_len positions, for `extend`."""
        return KVCache(batch_size, max_len)

    @torch.no_grad()
    def extend(self, cache: KVCache, idx: Tensor, audio: Tensor | None = None, audio_idx: Tensor | None = None) -> Tensor | None:
        """Append [audio][idx] to `cache` (soft tokens at any point: a clip first, a voice before an answer): the last position's logits
        (B, V), or None when idx is empty (a clip read ahead of any question, omni.serve.chat)."""
        logits = self.forward(idx, audio=audio, kv_cache=cache, audio_idx=audio_idx)
        return logits[:, -1] if idx.size(1) else None

    @torch.no_grad()
    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """The next position's logits (B, V) after appending `tokens` (B,) to the cache."""
        return self.forward(tokens.unsqueeze(1), kv_cache=cache)[:, -1]

    @torch.no_grad()
    def step_many(self, tokens: Tensor, caches: list[KVCache], room: int = 64) -> Tensor:
        """`step` for several sequences that each keep a cache of their own (e.g. the chat's
        conversations, started at different times): one batched forward on their `KVCache.stack`, which
        is kept for the next call while the same caches step together (room: the steps a batch is made
        for, fewer where a sequence's own cache has less room); a cache that steps alone or in another
        batch is brought up to date first. The same logits as stepping each alone, up to float rounding;
        read a cache's own slots only after its batch's `unstack` (or its next step alone)."""
        batch = caches[0].batch
        if batch is None or not batch.stacks(caches):
            if len(caches) == 1:  # alone: step its own cache (a batch of one would only copy it)
                if batch is not None:
                    batch.unstack()
                return self.step(tokens, caches[0])
            room = max(1, min([room] + [c.max_len - c.pos for c in caches]))
            batch = KVCache.stack(caches, room)
        return self.step(tokens, batch)

    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Weights as model.safetensors plus config.json (never pickle); dtype (e.g. torch.float16)
        stores the floating-point weights at that precision (load() reads them back as float32)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "GPT":
        from safetensors.torch import load_file

        directory = Path(directory)
        config = GPTConfig(**json.loads((directory / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(config)  # no init work: every parameter is overwritten below
        state = load_file(str(directory / "model.safetensors"), device=str(device))
        # weights stored at half precision compute in float32, like a freshly built model
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model._build_rotary(config.sequence_len)
        return model
