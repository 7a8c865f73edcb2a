"""A Hugging Face causal LM (`AutoModelForCausalLM`: Qwen3, Llama, ...) behind omni's LM interface.

Design choices:
- The audio prefix goes in through `inputs_embeds`, the left padding through `attention_mask`, and
  positions are given explicitly as `cumsum(mask) - 1`, so each sample's real tokens are numbered
  0, 1, ... exactly as in omni's GPT (and as HF's own `generate` does for left-padded batches).
- Loss on the text positions only (targets -1 = ignore), computed here in float32 rather than by
  HF's `labels`, which would shift the targets a second time.
- Generation is our own small loop over HF's KV cache (`past_key_values`), so every backbone shares
  one greedy/sampling rule (omni.model.sampling.next_tokens) and one `stream` signature.
- The tokenizer is the model's own (`AutoTokenizer`), with its chat template; BOS is the model's
  bos token, or its eos token where it has none (Qwen), and end of text is the eos token: answers
  end there (eos_id), never at bos_id.
- `forward(..., embeds=)` takes the inputs at the text positions as embeddings (audio spliced
  mid-text by instruction tuning), as omni's GPT does.
- k-bit loading (`load_in` "8bit" | "4bit") goes through bitsandbytes and needs CUDA: asked for
  without CUDA it is refused before anything is read.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from omni.model.sampling import stream_tokens

LOAD_IN = ("", "8bit", "4bit")


@dataclass
class HFShape:
    n_embd: int  # hidden size (the width the projector must produce)
    vocab_size: int  # rows of the input embedding
    sequence_len: int  # max positions the model was configured for


class HFTokenizer:
    """omni's tokenizer interface (vocab_size, bos_id, eos_id, encode, decode) over an HF tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None or tok.eos_token_id is None:
            raise ValueError(f"{tok.name_or_path}: the tokenizer has neither a bos nor an eos token to start and end a text")
        self.bos_id: int = int(bos)
        self.eos_id: int = int(tok.eos_token_id)
        self.vocab_size: int = len(tok)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def chat_ids(self, user: str) -> list[int]:
        """The model's chat template around one user turn, ready for the assistant's answer."""
        text = self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        self.tok.save_pretrained(str(directory))


class HFLM(nn.Module):
    """embed / forward(idx, targets, audio, audio_mask) / generate / stream / save, as omni's GPT."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        c = model.config
        self.config = HFShape(c.hidden_size, model.get_input_embeddings().num_embeddings, getattr(c, "max_position_embeddings", 4096))
        # transformers 5.x renamed past_key_values to cache (the old name goes in 5.40); older ones know only the old
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def embed(self, idx: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(idx)

    def _run(self, x: Tensor, mask: Tensor, pos: Tensor, past=None):
        return self.model(inputs_embeds=x, attention_mask=mask.long(), position_ids=pos, use_cache=past is not None, **{self._cache_kw: past})

    def forward(self, idx: Tensor, targets: Tensor | None = None, audio: Tensor | None = None, audio_mask: Tensor | None = None,
                embeds: Tensor | None = None, audio_idx: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) float32 for the text positions, or the mean text loss if targets are given.
        embeds (B, T, n_embd): the inputs at idx's positions instead of embed(idx), for audio spliced into
        the middle of a text (omni.experiments.tuning; idx is -1 there and not read), as omni's GPT.
        audio_idx: omni's GPT reads the token ids of a prefix's text for its value embeddings; an HF
        model has nothing keyed by token ids beyond its embeddings, so it is accepted and not needed."""
        if embeds is not None and embeds.shape != (*idx.shape, self.config.n_embd):
            raise ValueError(f"embeds must be (B, T, n_embd)={(*idx.shape, self.config.n_embd)}, got {tuple(embeds.shape)}")
        x, mask, A = self._inputs(idx, audio, audio_mask, embeds)
        logits = self._run(x, mask, positions(mask)).logits[:, A:].float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def _inputs(self, idx: Tensor, audio: Tensor | None, audio_mask: Tensor | None, embeds: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        x = self.embed(idx) if embeds is None else embeds.to(self.model.get_input_embeddings().weight.dtype)
        B, T = idx.shape
        text_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        if audio is None:
            if audio_mask is not None:
                raise ValueError("audio_mask given without audio")
            return x, text_mask, 0
        if audio.ndim != 3 or audio.size(0) != B or audio.size(2) != self.config.n_embd:
            raise ValueError(f"audio must be (B={B}, A, n_embd={self.config.n_embd}), got {tuple(audio.shape)}")
        if audio_mask is None:
            audio_mask = torch.ones(audio.shape[:2], dtype=torch.bool, device=idx.device)
        audio = audio.masked_fill(~audio_mask.unsqueeze(-1), 0.0)  # garbage in padded slots cannot leak
        return torch.cat([audio.to(x.dtype), x], dim=1), torch.cat([audio_mask, text_mask], dim=1), audio.size(1)

    @torch.no_grad()
    def generate(self, idx: Tensor, audio: Tensor | None = None, audio_mask: Tensor | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None,
                 seed: int | None = None, use_cache: bool = True, audio_idx: Tensor | None = None) -> Tensor:
        """New tokens (B, n_new): all of `stream`'s steps, stacked."""
        steps = list(self.stream(idx, audio, audio_mask, max_new_tokens, temperature, top_k, top_p, stop_token, seed, use_cache))
        return torch.stack(steps, dim=1) if steps else torch.empty(idx.size(0), 0, dtype=torch.long, device=idx.device)

    @torch.no_grad()
    def stream(self, idx: Tensor, audio: Tensor | None = None, audio_mask: Tensor | None = None, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None,
               seed: int | None = None, use_cache: bool = True, audio_idx: Tensor | None = None) -> Iterator[Tensor]:
        """Yields the next token of every sample, (B,) long, one step at a time (as omni.model.gpt.GPT.stream;
        audio_idx as in forward: not needed here)."""
        if idx.size(1) == 0:
            raise ValueError("generate needs at least one text token in idx (e.g. BOS) to predict from")
        gen = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
        if use_cache:
            logits, cache = self.prefill(idx, audio, audio_mask, max_new_tokens)
            step = lambda nxt: self.step(nxt, cache)  # noqa: E731
        else:  # the reference for the cache: the whole sequence again at every step
            x, mask, _ = self._inputs(idx, audio, audio_mask)
            state = {"x": x, "mask": mask}

            def step(nxt: Tensor) -> Tensor:
                state["x"] = torch.cat([state["x"], self.embed(nxt.unsqueeze(1))], dim=1)
                state["mask"] = torch.cat([state["mask"], torch.ones_like(nxt, dtype=torch.bool).unsqueeze(1)], dim=1)
                return self._run(state["x"], state["mask"], positions(state["mask"])).logits[:, -1].float()

            logits = self._run(x, mask, positions(mask)).logits[:, -1].float()
        yield from stream_tokens(logits, step, max_new_tokens, stop_token, temperature, top_k, top_p, gen)

    @torch.no_grad()
    def prefill(self, idx: Tensor, audio: Tensor | None = None, audio_mask: Tensor | None = None, max_new_tokens: int = 64,
                audio_idx: Tensor | None = None) -> tuple[Tensor, "HFCache"]:
        """As omni.model.gpt.GPT.prefill: (the last position's logits (B, V), the cache for `step`).
        max_new_tokens: HF's cache grows as it goes, so it is not needed here."""
        from transformers import DynamicCache

        x, mask, _ = self._inputs(idx, audio, audio_mask)
        cache = HFCache(DynamicCache(), mask, positions(mask))
        return self._run(x, mask, cache.pos, cache.past).logits[:, -1].float(), cache

    @torch.no_grad()
    def step(self, tokens: Tensor, cache: "HFCache") -> Tensor:
        """The next position's logits (B, V) after appending `tokens` (B,) to the cache."""
        return self.extend(cache, tokens.unsqueeze(1))

    def new_cache(self, batch_size: int, max_len: int = 0) -> "HFCache":
        """An empty cache for `extend` (max_len: HF's cache grows as it goes, so it is not needed)."""
        from transformers import DynamicCache

        device = self.model.get_input_embeddings().weight.device
        empty = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return HFCache(DynamicCache(), empty.bool(), empty)

    @torch.no_grad()
    def extend(self, cache: "HFCache", idx: Tensor, audio: Tensor | None = None, audio_idx: Tensor | None = None) -> Tensor | None:
        """As omni.model.gpt.GPT.extend: append [audio][idx] to `cache`; the last position's logits (B, V),
        or None when idx is empty."""
        x, mask, _ = self._inputs(idx, audio, None)
        start = cache.pos[:, -1:] + 1 if cache.pos.size(1) else torch.zeros(idx.size(0), 1, dtype=torch.long, device=idx.device)
        pos = start + torch.arange(x.size(1), device=idx.device)
        cache.mask, cache.pos = torch.cat([cache.mask, mask], dim=1), torch.cat([cache.pos, pos], dim=1)
        logits = self._run(x, cache.mask, pos, cache.past).logits
        return logits[:, -1].float() if idx.size(1) else None

    @torch.no_grad()
    def step_many(self, tokens: Tensor, caches: list["HFCache"]) -> Tensor:
        """`step` for several sequences with caches of their own (omni.model.gpt.GPT.step_many): here one
        after the other, since HF's caches of different lengths do not stack without copying every layer."""
        return torch.cat([self.step(tokens[i : i + 1], c) for i, c in enumerate(caches)])

    def save(self, directory: str | Path) -> None:
        self.model.save_pretrained(str(directory))


@dataclass
class HFCache:
    """An HF model's KV cache with the attention mask and positions that go with it (omni's KVCache keeps both inside)."""

    past: object  # transformers' DynamicCache
    mask: Tensor  # (B, S) bool, False = left padding
    pos: Tensor  # (B, S) position ids

    def copy(self, max_len: int = 0) -> "HFCache":
        """A cache of its own with the same contents (omni.model.kvcache.KVCache.copy; max_len not needed)."""
        return HFCache(copy.deepcopy(self.past), self.mask.clone(), self.pos.clone())

    def select(self, index: Tensor) -> None:
        """Keep the samples `index`, in that order, repeats allowed (omni.model.kvcache.KVCache.select)."""
        self.past.reorder_cache(index)
        self.mask, self.pos = self.mask[index], self.pos[index]


def positions(mask: Tensor) -> Tensor:
    """Position ids for a left-padded batch: real tokens count from 0; padded slots get 0 (masked anyway)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def check_load_in(load_in: str) -> None:
    """Refuse a k-bit request that cannot work here, before anything loads."""
    if load_in not in LOAD_IN:
        raise ValueError(f"load_in {load_in!r} is not one of {LOAD_IN} (parameter `load_in`)")
    if load_in and not torch.cuda.is_available():
        raise ValueError(f"load_in={load_in!r} needs CUDA (bitsandbytes k-bit weights); this machine has none (parameter `load_in`)")


def load_hf(name: str, device: torch.device, load_in: str = "", dtype: torch.dtype | None = None) -> tuple[HFLM, HFTokenizer]:
    """A local folder or hub id -> (HFLM, HFTokenizer). The LM's weights are frozen by the caller."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_load_in(load_in)
    kw: dict = {}
    if load_in:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if load_in == "8bit"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
        )
        kw["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32, **kw)
    if not load_in:
        model = model.to(device)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(name))
    return HFLM(model), tok
