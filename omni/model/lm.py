"""The language model behind the projector: one small interface, three kinds of checkpoint, LoRA.

Every backbone is an nn.Module with
    config.n_embd, config.vocab_size           width of the soft prefix; vocabulary
    embed(idx) -> (B, T, n_embd)               token embeddings exactly as the model sees them
    forward(idx, targets=None, audio=None, audio_mask=None, embeds=None)
                                               [audio (B, A, n_embd), left-padded: audio_mask True = real][idx];
                                               logits of the text positions, or the text loss (targets -1 = ignore);
                                               embeds (B, T, n_embd): the inputs at idx's positions (audio spliced
                                               mid-text, idx -1 there), instead of embed(idx)
    stream(idx, audio, audio_mask, max_new_tokens, temperature, top_k, top_p, stop_token, seed, use_cache)
                                               yields (B,) next tokens, KV cache unless use_cache=False
    generate(...same...) -> (B, n_new)         stream's steps stacked
and comes with a tokenizer: vocab_size, bos_id (starts a text), eos_id (ends it; omni's and nanochat's
tokenizers: the same token as bos_id, Hugging Face ones: the tokenizer's eos), encode, decode.

omni.model.gpt.GPT meets it as is; a nanochat checkpoint IS an omni GPT once read (omni.model.nanochat);
a Hugging Face causal LM is wrapped by omni.model.hf_lm.HFLM.

Design choices:
- `load_lm` inspects the folder: config.json + model.safetensors (omni) | model_<step>.pt +
  meta_<step>.json (nanochat) | anything else, local folder or hub id (transformers). No registry.
- LoRA is peft's, injected in place (`inject_adapter_in_model`) so the backbone keeps its own
  class and methods; its adapters are saved as safetensors + JSON, loaded back onto a fresh
  backbone for inference, and can be merged into the base weights.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from omni.model.gpt import GPT
from omni.model.hf_lm import HFLM, check_load_in, load_hf
from omni.model.nanochat import NanochatTokenizer, is_checkpoint, load_nanochat
from omni.model.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

KINDS = ("omni", "nanochat", "hf")


def lm_kind(path_or_id: str | Path) -> str:
    """Which of the three a path (or hub id) is, from the files it holds."""
    p = Path(path_or_id)
    if (p / "model.safetensors").exists() and (p / "config.json").exists():
        cfg = json.loads((p / "config.json").read_text())
        if "n_embd" in cfg and "model_type" not in cfg:
            return "omni"
    if is_checkpoint(p):
        return "nanochat"
    return "hf"


def load_lm(path_or_id: str | Path, device: torch.device | str = "cpu", load_in: str = "", dtype: torch.dtype | None = None):
    """(lm, tokenizer) for an omni LM folder, a nanochat checkpoint folder, or an HF model (folder or hub id).

    load_in: "" | "8bit" | "4bit" (HF models on CUDA only; refused before loading otherwise)."""
    device = torch.device(device)
    check_load_in(load_in)
    kind = lm_kind(path_or_id)
    if load_in and kind != "hf":
        raise ValueError(f"load_in={load_in!r} is for Hugging Face LMs; {path_or_id} is an {kind} LM (parameter `load_in`)")
    if kind == "omni":
        p = Path(path_or_id)
        if (p / "tokenizer.pkl").exists():  # a nanochat LM saved in omni's format after projector+lm training
            tok = NanochatTokenizer.load(p)
        else:
            tok = load_tokenizer(str(p / "tokenizer.json")) if (p / "tokenizer.json").exists() else ByteTokenizer()
        return GPT.load(p, device=device), tok
    if kind == "nanochat":
        return load_nanochat(path_or_id, device)
    p = Path(path_or_id)
    if p.exists() and not (p / "config.json").exists():
        raise FileNotFoundError(f"{p}: neither an omni LM (config.json + model.safetensors), a nanochat checkpoint "
                                f"(model_<step>.pt + meta_<step>.json) nor a Hugging Face model folder (config.json)")
    return load_hf(str(path_or_id), device, load_in=load_in, dtype=dtype)


def is_hub_id(path_or_id: str | Path) -> bool:
    """"owner/name" that is not on disk. Not one: anything under `runs/` (omni's own output folder, where a
    missing LM is pretrained, even in a fresh checkout without runs/) or `models/` (the repository's
    committed LMs), or whose owner is a local folder."""
    p = Path(path_or_id)
    return (not p.exists() and len(p.parts) == 2 and not p.is_absolute() and p.parts[0] not in ("runs", "models", ".", "..")
            and not Path(p.parts[0]).exists())


def save_lm(lm: nn.Module, tok, directory: str | Path) -> Path:
    """Write the LM and its tokenizer so that load_lm reads them back (after projector+lm training)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(lm, HFLM):
        lm.save(d)
        tok.save(d)
        return d
    lm.save(d)  # omni's GPT (a nanochat checkpoint became one when read)
    if isinstance(tok, BPETokenizer):
        tok.save(d / "tokenizer.json")
    elif isinstance(tok, NanochatTokenizer):
        # nanochat's own format; read back only through omni.model.nanochat's restricted unpickler
        (d / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc))
    return d


# --- LoRA ------------------------------------------------------------------------------------

# attention and MLP projections of each backbone (peft matches module names by suffix)
GPT_TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc")
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSpec:
    rank: int = 16  # adapter rank r
    alpha: float = 32.0  # scale alpha / r on the adapter's output
    dropout: float = 0.0  # dropout on the adapter's input
    targets: str = ""  # comma-separated module names; "" = the backbone's attention + MLP projections

    def target_list(self, lm: nn.Module) -> list[str]:
        if self.targets.strip():
            return [t.strip() for t in self.targets.split(",") if t.strip()]
        return list(HF_TARGETS if isinstance(lm, HFLM) else GPT_TARGETS)


def add_lora(lm: nn.Module, spec: LoraSpec) -> dict[str, nn.Parameter]:
    """Inject peft LoRA adapters into `lm` in place; returns the adapter parameters (name -> p), fp32."""
    from peft import LoraConfig, inject_adapter_in_model

    if spec.rank < 1:
        raise ValueError(f"lora_rank={spec.rank} must be >= 1 (parameter `lora_rank`)")
    targets = spec.target_list(lm)
    present = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(f"lora_targets {missing} name no linear module of this LM (it has {sorted(present)[:12]}) (parameter `lora_targets`)")
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(cfg, lm)
    params = lora_parameters(lm)
    for p in params.values():
        p.data = p.data.float()  # adapters train in fp32 even on a bf16 / k-bit base
        p.requires_grad_(True)
    return params


def lora_parameters(lm: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in lm.named_parameters() if "lora_" in n}


def save_lora(lm: nn.Module, spec: LoraSpec, directory: str | Path) -> None:
    """lora.safetensors (adapter weights) + lora.json (the spec), beside the audio path."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().float().contiguous().cpu() for n, p in lora_parameters(lm).items()}, d / "lora.safetensors")
    (d / "lora.json").write_text(json.dumps(asdict(spec), indent=2))


def load_lora(lm: nn.Module, directory: str | Path) -> LoraSpec | None:
    """Put saved adapters onto a fresh backbone; None when the folder has none."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "lora.json").exists():
        return None
    spec = LoraSpec(**json.loads((d / "lora.json").read_text()))
    params = add_lora(lm, spec)
    state = load_file(d / "lora.safetensors")
    if set(state) != set(params):
        raise ValueError(f"{d / 'lora.safetensors'}: adapter names do not match this LM ({sorted(set(state) ^ set(params))[:4]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
    return spec


def merge_lora(lm: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back; same outputs, no adapters."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(lm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = lm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else lm
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return lm
