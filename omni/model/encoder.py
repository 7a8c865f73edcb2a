"""The frozen Whisper encoder: a variable-length forward that returns
every hidden state, and the choice of layer(s) the projector reads.

Design choices:
- Weights come from omni.model.whisper_weights (embedded tiny.en, a folder, a hub id, ModelScope).
- Our own encoder, not transformers': transformers' WhisperEncoder refuses any input but 3000 mel
  frames (30 s), and its internals move between versions. Ours is ~60 lines with the SAME parameter
  names as `model.encoder.*`, so a transformers state dict loads as is.
- mode "var" (default) runs only the clip's frames: the sinusoidal positions are sliced to the
  clip's length and padded frames are masked out of the convolutions and of attention, so a clip's
  states do not depend on what else is in the batch. On 3-4 s clips it is about 14x faster
  than padding to 30 s (benchmarks/bench_encoder.py, batch 8, 2 CPU cores).
  Whisper was trained on 30 s windows only, so var states drift from the padded ones a little (the
  benchmark reports the cosine similarity); mode "pad30" reproduces the original model exactly.
- Hidden states follow transformers' `output_hidden_states` convention: for L layers, L + 1 states:
  state 0 = input of layer 0 (after the convs and positions), state i = output of layer i-1 for
  i < L, and state L = the final output AFTER the encoder's layer_norm (transformers overwrites the
  last hidden state with last_hidden_state, so the raw output of the last layer is never exposed).
- LayerSelect is s3prl's featurizer: a fixed index, or a softmax over zero-initialised per-state
  scalars (optionally after a parameter-free layer norm of each state).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from omni.model.mel import N_FRAMES_30S, log_mel
from omni.model.whisper_weights import EMBEDDED, load_encoder_state, resolve_source
from omni.params import ParamError, require

MODES = ("var", "pad30")  # how a clip is encoded: its own length, or padded to Whisper's 30 s window


# ---------------------------------------------------------------------------------------------
# the encoder


@dataclass
class EncoderConfig:
    n_mels: int = 80  # 128 for large-v3
    d_model: int = 384
    n_heads: int = 6
    n_layers: int = 4
    ffn_dim: int = 1536
    n_ctx: int = 1500  # positions after the stride-2 conv: 30 s


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)  # Whisper's key projection has no bias
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(head_dim), as Whisper
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.n_heads)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder returning all hidden states. Parameter names = transformers' model.encoder.*"""

    def __init__(self, cfg: EncoderConfig, source: str = ""):
        super().__init__()
        self.cfg = cfg
        self.source = source
        self.n_mels, self.d_model, self.n_layers = cfg.n_mels, cfg.d_model, cfg.n_layers
        self.n_states = cfg.n_layers + 1
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model)

    @classmethod
    def from_source(cls, source: str = EMBEDDED, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "WhisperEncoder":
        """Frozen (no grad, eval) encoder with the weights of `source` (see resolve_source)."""
        folder = resolve_source(source)
        hf = json.loads((folder / "config.json").read_text())
        cfg = EncoderConfig(
            n_mels=hf["num_mel_bins"],
            d_model=hf["d_model"],
            n_heads=hf["encoder_attention_heads"],
            n_layers=hf["encoder_layers"],
            ffn_dim=hf["encoder_ffn_dim"],
            n_ctx=hf["max_source_positions"],
        )
        model = cls(cfg, source=source)
        state = load_encoder_state(folder)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"encoder={source!r} ({folder}): weights do not fit a Whisper encoder; missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return model

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor | None = None, mode: str = "var") -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, n_mels, T), mel_lengths (B,) -> (hidden (B, n_states, T', d_model), frame_lengths (B,)).

        T' = ceil(max(mel_lengths) / 2) (= ceil(T / 2) for log_mel's output); frame_lengths =
        ceil(mel_lengths / 2); frames past a clip's length are 0 in every state.
        """
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"mel must be (B, {self.n_mels}, T), got shape {tuple(mel.shape)}")
        B, _, T = mel.shape
        lengths = torch.full((B,), T, dtype=torch.long) if mel_lengths is None else torch.as_tensor(mel_lengths).long().cpu()
        if lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > T:
            raise ValueError(f"mel_lengths must be (B,) = ({B},) in [1, T={T}], got {lengths.tolist()}")
        if int(lengths.max()) > N_FRAMES_30S:
            raise ValueError(
                f"a clip has {int(lengths.max())} mel frames (> {N_FRAMES_30S} = 30 s); Whisper sees at most 30 s: "
                f"chunk longer audio into <= 30 s pieces first"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        mel = mel.to(self.conv1.weight.dtype)
        T_in = int(lengths.max())
        frame_lengths = (lengths + 1) // 2
        T_out = (T_in + 1) // 2
        dev = mel.device
        valid_in = (torch.arange(T_in)[None, :] < lengths[:, None]).to(dev)  # (B, T_in)
        if mode == "pad30":
            # Input of 3000 frames (log_mel(pad30=True)) is used as given: the original model exactly.
            # Shorter input is padded like the feature extractor pads audio: log-mel of digital
            # silence, after the clamp, is (clip max - 2). Only the 2 frames after the clip's end
            # differ (the extractor's STFT windows there still overlap the clip's last samples).
            if T < N_FRAMES_30S:
                m = mel[:, :, :T_in].masked_fill(~valid_in[:, None, :], -torch.inf)
                floor = m.amax(dim=(1, 2), keepdim=True) - 2.0
                x = floor.expand(B, self.n_mels, N_FRAMES_30S).clone()
                x[:, :, :T_in] = torch.where(valid_in[:, None, :], mel[:, :, :T_in], floor)
            else:
                x = mel[:, :, :N_FRAMES_30S]
            states = self._run(x, None)
            states = states[:, :, :T_out]
        else:
            x = mel[:, :, :T_in] * valid_in[:, None, :]
            mask = None
            if int(lengths.min()) < T_in:  # key padding mask: True = attend
                mask = (torch.arange(T_out)[None, :] < frame_lengths[:, None]).to(dev)[:, None, None, :]
            states = self._run(x, mask, valid_in)
        valid_out = (torch.arange(T_out)[None, :] < frame_lengths[:, None]).to(dev)
        return states * valid_out[:, None, :, None], frame_lengths

    def _run(self, mel: torch.Tensor, mask: torch.Tensor | None, valid_in: torch.Tensor | None = None) -> torch.Tensor:
        x = F.gelu(self.conv1(mel))
        if valid_in is not None:  # conv2 must see zeros past a clip's end, as it would alone
            x = x * valid_in[:, None, :]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T', d)
        if x.shape[1] > self.embed_positions.num_embeddings:
            raise ValueError(f"{x.shape[1]} encoder frames > {self.embed_positions.num_embeddings} positions (30 s)")
        x = x + self.embed_positions.weight[: x.shape[1]]
        states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        states[-1] = self.layer_norm(x)  # transformers' convention: last state is after layer_norm
        return torch.stack(states, dim=1)

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for backward in a training step
    def encode(self, waves: list[torch.Tensor], mode: str = "var", batch_size: int = 8) -> list[torch.Tensor]:
        """Per clip (n_states, T', d_model) on the CPU, in input order. Batches clips of similar
        length together (sorted by length) so var mode pads little."""
        order = sorted(range(len(waves)), key=lambda i: -waves[i].numel())
        out: list[torch.Tensor | None] = [None] * len(waves)
        device = self.conv1.weight.device
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            # pad30 takes the feature extractor's own 3000 frames: exactly the original model's input
            mel, lengths = log_mel([waves[i] for i in idx], n_mels=self.n_mels, pad30=mode == "pad30")
            hidden, frames = self(mel.to(device), lengths, mode=mode)
            for j, i in enumerate(idx):
                out[i] = hidden[j, :, : int(frames[j])].float().cpu()
        return out  # type: ignore[return-value]


def collate_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip hidden states [(S, T_i, d)] (what `encode` and the feature cache give) -> right-padded
    (B, S, T_max, d) and lengths (B,): the batch LayerSelect and the projector read."""
    lengths = torch.tensor([s.size(1) for s in states], dtype=torch.long)
    S, d = states[0].size(0), states[0].size(2)
    out = states[0].new_zeros(len(states), S, int(lengths.max()), d)
    for i, s in enumerate(states):
        out[i, :, : s.size(1)] = s
    return out, lengths


def mask_frames(hidden: torch.Tensor, lengths: torch.Tensor, share: float, span: int, gen: torch.Generator) -> torch.Tensor:
    """SpecAugment's time masking on cached states (Park et al. 2019): in each clip, spans of `span`
    frames starting at random, about `share` of its frames in all, zeroed in every state; (B, S, T, d)
    in, the masked copy out. Why: a few thousand clips of a dozen voices are learned by heart within a
    thousand steps (held-out WER rises again); hiding a stretch makes the projector read it from context."""
    B, _, T, _ = hidden.shape
    n = torch.round(lengths.float() * share / span).long()  # spans per clip
    k = int(n.max()) if B else 0
    if k == 0:
        return hidden
    starts = (torch.rand(B, k, generator=gen) * (lengths[:, None] - span + 1).clamp(min=1)).long()
    starts = torch.where(torch.arange(k)[None, :] < n[:, None], starts, torch.full_like(starts, T))  # unused spans fall off the end
    t = torch.arange(T)[None, None, :]
    hit = ((t >= starts[..., None]) & (t < starts[..., None] + span)).any(1)  # (B, T)
    return hidden.masked_fill(hit[:, None, :, None].to(hidden.device), 0.0)


# ---------------------------------------------------------------------------------------------
# which hidden state(s) the projector reads


class LayerSelect(nn.Module):
    """layer: "last" | "middle" | int index (negative allowed) | "weighted" | "weighted_ln": which hidden
    state(s) the projector reads. Same name and values as SpeechLMConfig.layer / AlignConfig.layer."""

    ONE_STATE = ("middle", "last")  # names of one state (which one depends on the encoder's depth)
    WEIGHTED = ("weighted", "weighted_ln")  # learned softmax mixes of every state (after a layer norm: _ln)
    NAMES = ONE_STATE + WEIGHTED  # every named choice; any other choice is a state index

    def __init__(self, layer: str | int, n_states: int):
        super().__init__()
        self.layer, self.n_states = layer, n_states
        self.index: int | None = None
        self.weights: nn.Parameter | None = None
        self.layer_norm = False
        if isinstance(layer, str) and layer in self.WEIGHTED:
            self.weights = nn.Parameter(torch.zeros(n_states))  # zero init = plain average at the start
            self.layer_norm = layer == "weighted_ln"
            return
        if layer == "last":
            index = n_states - 1
        elif layer == "middle":
            index = n_states // 2
        elif isinstance(layer, int) and not isinstance(layer, bool):
            index = layer
        elif isinstance(layer, str) and re.fullmatch(r"-?\d+", layer.strip()):
            index = int(layer)
        else:
            raise ValueError(f"layer={layer!r} is not valid; choose one of {', '.join(self.NAMES)} or a state index")
        if not -n_states <= index < n_states:
            raise ValueError(f"layer={layer!r} is out of range for {n_states} hidden states (valid: {-n_states}..{n_states - 1})")
        self.index = index % n_states

    def states_read(self) -> list[int] | None:
        """The states this choice reads ([index] for one state, None for all): a caller may load just
        those (FeatureCache.load_states(rows, layers)) and pass them in, (B, 1, T, d)."""
        return None if self.weights is not None else [self.index]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, T, d) -> (B, T, d); an unbatched (S, T, d) gives (T, d). S is n_states, or 1 for a
        one-state choice given only its state (states_read)."""
        if hidden.dim() == 3:
            return self.forward(hidden[None])[0]
        one = self.weights is None and hidden.dim() == 4 and hidden.shape[1] == 1
        if hidden.dim() != 4 or (hidden.shape[1] != self.n_states and not one):
            raise ValueError(f"hidden must be (B, {self.n_states}, T, d), got shape {tuple(hidden.shape)}")
        if self.weights is None:
            return hidden[:, 0 if one else self.index]
        if self.layer_norm:
            hidden = F.layer_norm(hidden, hidden.shape[-1:])
        w = F.softmax(self.weights, dim=0).to(hidden.dtype)
        return torch.einsum("s,bstd->btd", w, hidden)

    def layer_weights(self) -> torch.Tensor:
        """(S,) how much each state contributes: one-hot for a fixed choice, softmax for weighted."""
        if self.weights is None:
            return F.one_hot(torch.tensor(self.index), self.n_states).float()
        return F.softmax(self.weights.detach(), dim=0)

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, n_states={self.n_states}"


# hidden states of the embedded encoder (4 layers + the input); other encoders are checked when loaded
KNOWN_STATES = {"tiny.en": 5}


def require_layer(layer: str, encoder: str) -> None:
    """`layer` names a LayerSelect choice; an index must exist in `encoder` (where known before it loads):
    a config refuses a bad layer in one line before any work starts."""
    if layer in LayerSelect.NAMES:
        return
    try:
        index = int(layer)
    except ValueError:
        raise ParamError(f"parameter `layer` = {layer!r}: must be one of {', '.join(LayerSelect.NAMES)} or a state index") from None
    n = KNOWN_STATES.get(encoder)
    require(n is None or -n <= index < n, "layer", layer, f"a state index of {encoder}: 0..{(n or 1) - 1} (or negative from the end)")


# ---------------------------------------------------------------------------------------------
# the full Whisper (encoder + decoder): the yardstick transcriber


def load_whisper_model(source: str = EMBEDDED):
    """(transformers WhisperForConditionalGeneration in eval mode, WhisperProcessor) for `source`."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    folder = resolve_source(source)
    model = WhisperForConditionalGeneration.from_pretrained(str(folder)).eval()
    processor = WhisperProcessor.from_pretrained(str(folder))
    return model, processor


@torch.inference_mode()
def whisper_transcribe(model, tokenizer, waves: list[torch.Tensor], batch_size: int = 8, **generate_kwargs) -> list[str]:
    """Greedy English transcription, no timestamps. `tokenizer` may be the processor or its tokenizer.
    generate_kwargs go to model.generate over the defaults (e.g. the temperature fallback)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    n_mels = model.config.num_mel_bins
    multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
    extra = {"language": "en", "task": "transcribe"} if multilingual else {}
    texts: list[str] = []
    for start in range(0, len(waves), batch_size):
        mel, _ = log_mel(waves[start : start + batch_size], n_mels=n_mels, pad30=True)
        mel = mel.to(model.device, model.dtype)
        ids = model.generate(
            mel,
            attention_mask=torch.ones(mel.shape[0], mel.shape[2], dtype=torch.long, device=model.device),
            **({"do_sample": False, "num_beams": 1, "return_timestamps": False} | extra | generate_kwargs),
        )
        texts += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    return texts
