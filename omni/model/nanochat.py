"""Read a nanochat checkpoint folder into omni's GPT, without unpickling anything that can run code.

nanochat (github.com/karpathy/nanochat) writes, per step, `model_<step:06d>.pt` (a torch.save'd
state dict), `meta_<step:06d>.json` (its `model_config` and training facts) and, once, a tokenizer
folder holding `tokenizer.pkl` (a pickled tiktoken Encoding) and `token_bytes.pt`.

Design choices:
- Weights: `torch.load(weights_only=True)` only (tensors and plain containers, no code).
- Tokenizer: the pickle is read by an unpickler that admits one global, tiktoken's `Encoding`, and
  maps it onto a stand-in that only records its state (name, pat_str, mergeable_ranks,
  special_tokens); nothing of tiktoken runs while unpickling. The Encoding is then rebuilt from
  that state. Any other global (os.system, builtins.eval, ...) is refused.
- Architecture: nanochat up to commit ccf4b7f (2026-01-07) is omni's GPT exactly (rotary base
  10000 with the same rotation, QK-norm after rotary, relu^2, parameter-free RMSNorm, untied head,
  softcap 15), so its weights load into omni.model.gpt.GPT unchanged. Its vocabulary padding (to a
  multiple of 64, from 2025-12-09) is cropped: padded rows are never indexed and their logits
  are sliced off by nanochat itself. Later checkpoints (residual/x0 lambdas, value embeddings,
  smear, backout, sliding windows, from aa530cd 2026-01-11) are refused, naming what differs.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch

from omni.model.gpt import GPT, GPTConfig

# state-dict keys of later nanochat architectures that omni's GPT does not implement
NEWER = ("resid_lambdas", "x0_lambdas", "value_embeds", "smear", "backout", "ve_gate")


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.glob("model_*.pt")) and any(path.glob("meta_*.json"))


def latest_step(path: Path) -> int:
    steps = [int(m.group(1)) for f in path.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", f.name))]
    if not steps:
        raise FileNotFoundError(f"{path}: no model_<step>.pt here")
    return max(steps)


class _EncodingState:
    """What tiktoken.Encoding.__getstate__ wrote; kept as data, never executed."""

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"tokenizer.pkl: expected an Encoding's state dict, got {type(state).__name__}")
        self.state = state


class SafeUnpickler(pickle.Unpickler):
    """Admits tiktoken's Encoding class only (as a stand-in that records its state)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"tokenizer.pkl: refused global {module}.{name} (only tiktoken.core.Encoding is allowed)")


def read_encoding_state(data: bytes) -> dict:
    obj = SafeUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise pickle.UnpicklingError("tokenizer.pkl: not a pickled tiktoken Encoding")
    st = obj.state
    ok = (isinstance(st.get("mergeable_ranks"), dict) and isinstance(st.get("special_tokens"), dict)
          and isinstance(st.get("pat_str"), str) and isinstance(st.get("name"), str))
    if not ok:
        raise pickle.UnpicklingError("tokenizer.pkl: the Encoding state lacks name/pat_str/mergeable_ranks/special_tokens")
    return st


class NanochatTokenizer:
    """nanochat's tokenizer (tiktoken, `<|bos|>` as document delimiter) with omni's interface."""

    def __init__(self, state: dict):
        import tiktoken

        self.enc = tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"],
                                     mergeable_ranks=state["mergeable_ranks"], special_tokens=state["special_tokens"])
        if "<|bos|>" not in state["special_tokens"]:
            raise ValueError("nanochat tokenizer has no <|bos|> special token")
        self.bos_id: int = state["special_tokens"]["<|bos|>"]
        self.eos_id: int = self.bos_id  # nanochat ends a document with the next one's BOS
        self.vocab_size: int = self.enc.n_vocab
        self._special = set(state["special_tokens"].values())

    @classmethod
    def load(cls, directory: str | Path) -> "NanochatTokenizer":
        return cls(read_encoding_state((Path(directory) / "tokenizer.pkl").read_bytes()))

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.enc.encode_ordinary(text)  # special tokens written in a text stay plain text
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if int(i) not in self._special])


def find_tokenizer(path: Path) -> Path:
    """The tokenizer folder: inside the checkpoint folder, or nanochat's base dir layout
    (<base>/base_checkpoints/d12 -> <base>/tokenizer)."""
    for d in (path, path / "tokenizer", path.parent.parent / "tokenizer"):
        if (d / "tokenizer.pkl").exists():
            return d
    raise FileNotFoundError(f"{path}: no tokenizer.pkl in it, in {path / 'tokenizer'}, or in {path.parent.parent / 'tokenizer'}")


def load_nanochat(path: str | Path, device: torch.device, step: int | None = None) -> tuple[GPT, NanochatTokenizer]:
    path = Path(path)
    step = latest_step(path) if step is None else step
    meta = json.loads((path / f"meta_{step:06d}.json").read_text())
    mc = dict(meta["model_config"])
    if mc.pop("window_pattern", "L").upper().strip("L"):
        raise ValueError(f"{path}: sliding-window attention (window_pattern) is a later nanochat architecture omni does not load")
    tok = NanochatTokenizer.load(find_tokenizer(path))
    state = torch.load(path / f"model_{step:06d}.pt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}  # torch.compile prefix; bf16 -> fp32
    newer = sorted({k for k in state for n in NEWER if n in k})
    if newer:
        raise ValueError(f"{path}: keys {newer[:4]} belong to a later nanochat architecture (after commit ccf4b7f) omni does not load")
    V = mc["vocab_size"]
    for k in ("transformer.wte.weight", "lm_head.weight"):
        state[k] = state[k][:V]  # crop nanochat's vocabulary padding
    if tok.vocab_size != V:
        raise ValueError(f"{path}: tokenizer vocab {tok.vocab_size} != model vocab_size {V}")
    gpt = GPT(GPTConfig(**mc))  # built on the CPU (rotary tables included), then overwritten
    gpt.load_state_dict(state, strict=True)
    return gpt.to(device), tok
