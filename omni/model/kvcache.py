"""The KV cache of omni's GPT (omni.model.gpt): keys and values of every layer, and which slots are padding.

Design choices:
- One tensor per kind for all layers, (n_layer, B, n_kv_head, max_len, head_dim), allocated on the first
  write in the dtype of the first keys (bf16 under autocast), so decoding costs no casts.
- Padding is explicit: `key_mask` says which slots are real and `pad` how many slots of left padding
  each sample's prefill had, so its real tokens keep positions 0, 1, ... whatever it is batched with.
- Sequences decoded together but started apart (the chat's conversations) each keep a cache of their
  own: `stack` makes one batch of them with room for a few more tokens, and the batch is kept from step
  to step while the same sequences step together (GPT.step_many); `unstack` writes what the batch
  added back into each sequence's cache when the set changes. Stacking anew every step copied every
  cache twice a step (for four conversations of the 7.3M LM: ~0.8 ms of a 6.6 ms step).
  `copy` gives each question about a clip its own continuation of the clip's cache.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer for incremental decoding, allocated on first use.

    Also remembers, per sample, which key slots are padding (`key_mask`) and how many slots
    of left padding the prefix had (`pad`), so later tokens get the right positions.
    """

    def __init__(self, batch_size: int, max_len: int):
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0  # number of slots filled so far (same for every sample: padding is explicit)
        self.k: Tensor | None = None  # (n_layer, B, n_kv_head, max_len, head_dim)
        self.v: Tensor | None = None
        self.key_mask: Tensor | None = None  # (B, max_len) bool, False = padded slot
        self.pad: Tensor | None = None  # (B,) long, left padding of the prefill
        self.prev_embedding: Tensor | None = None  # (B, 1, D) the last position's embedding before smear (GPTConfig.smear)
        self.prev_keys: dict[int, Tensor] = {}  # layer -> (B, 1, n_kv_head, hd) the last position's key before smearing (GPTConfig.smear_keys)
        self.batch: KVCache | None = None  # the stacked batch this sequence is a row of: its own slots lag behind until batch.unstack()
        self.members: list[KVCache] = []  # a stacked batch's sequences, row by row (empty for any other cache)
        self.start = 0  # a stacked batch's slot where its own steps begin (what unstack writes back)

    def select(self, index: Tensor) -> None:
        """Keep the samples `index` (B',) long, in that order, repeats allowed: a beam search's
        surviving hypotheses, each continuing from its parent's cache."""
        if self.k is not None:
            self.k, self.v = self.k[:, index], self.v[:, index]
        if self.key_mask is not None:
            self.key_mask, self.pad = self.key_mask[index], self.pad[index]
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding[index]
        self.prev_keys = {i: k[index] for i, k in self.prev_keys.items()}
        self.batch_size = int(index.numel())

    @classmethod
    def stack(cls, caches: list["KVCache"], room: int = 1) -> "KVCache":
        """Single-sequence caches of different lengths as one batch with room for `room` more tokens:
        each sequence right-aligned so that all end at slot P (the longest's length), the slots before it
        masked as left padding (its `pad` grows by as many, so its positions do not change). The batched
        decoding steps of several conversations (GPT.step_many), each keeping a cache of its own, which
        `unstack` brings up to date. A cache that is a row of another batch is brought up to date first."""
        for c in caches:
            if c.batch is not None:
                c.batch.unstack()
        P = max(c.pos for c in caches)
        first = caches[0]
        out = cls(len(caches), P + room)
        n_layer, _, H, _, hd = first.k.shape
        out.k, out.v = first.k.new_zeros(n_layer, len(caches), H, P + room, hd), first.v.new_zeros(n_layer, len(caches), H, P + room, hd)
        out.key_mask = torch.ones(len(caches), P + room, dtype=torch.bool, device=first.k.device)
        out.pad = torch.zeros(len(caches), dtype=torch.long, device=first.k.device)
        for i, c in enumerate(caches):
            s = P - c.pos  # slots of padding before this sequence
            out.k[:, i, :, s:P], out.v[:, i, :, s:P] = c.k[:, 0, :, : c.pos], c.v[:, 0, :, : c.pos]
            out.key_mask[i, :s] = False
            out.key_mask[i, s:P] = c.key_mask[0, : c.pos]
            out.pad[i] = c.pad[0] + s
            c.batch = out
        out.pos = out.start = P
        out.members = list(caches)
        if first.prev_embedding is not None:
            out.prev_embedding = torch.cat([c.prev_embedding for c in caches])
        out.prev_keys = {layer: torch.cat([c.prev_keys[layer] for c in caches]) for layer in first.prev_keys}
        return out

    def stacks(self, caches: list["KVCache"]) -> bool:
        """Whether this batch is `caches`, row by row, with room for one more step."""
        return len(self.members) == len(caches) and all(a is b for a, b in zip(self.members, caches)) and self.pos < self.max_len

    def unstack(self) -> None:
        """Write the steps taken on this `stack`ed batch since it was made (or last unstacked) back into
        each sequence's own cache, and release them: they step alone, or in another batch, from here."""
        n = self.pos - self.start  # slots the batch's steps wrote
        for i, c in enumerate(self.members):
            c.k[:, 0, :, c.pos : c.pos + n], c.v[:, 0, :, c.pos : c.pos + n] = self.k[:, i, :, self.start : self.pos], self.v[:, i, :, self.start : self.pos]
            c.key_mask[0, c.pos : c.pos + n] = True
            c.pos += n
            if n and self.prev_embedding is not None:
                c.prev_embedding = self.prev_embedding[i : i + 1]
            if n:
                c.prev_keys = {layer: k[i : i + 1] for layer, k in self.prev_keys.items()}
            c.batch = None
        self.members, self.start = [], self.pos

    def update(self, layer: int, k: Tensor, v: Tensor, n_layer: int) -> tuple[Tensor, Tensor]:
        # k, v (B, n_kv_head, T, hd) for the new tokens; returns all keys/values up to pos + T
        if self.k is None:
            B, H, _, hd = k.shape
            shape = (n_layer, B, H, self.max_len, hd)
            # dtype follows the first k (bf16 under autocast) so the cache costs no casts later
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        T = k.size(2)
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer, :, :, : self.pos + T], self.v[layer, :, :, : self.pos + T]

    def copy(self, max_len: int) -> "KVCache":
        """A cache of its own with the same contents and room for max_len slots in all: a chat clip's
        audio is read once into a cache, and each question about it goes on in a copy."""
        if max_len < self.pos:
            raise ValueError(f"copy: the cache holds {self.pos} slots, more than max_len {max_len}")
        c = KVCache(self.batch_size, max_len)
        c.pos = self.pos
        if self.k is not None:
            n_layer, B, H, _, hd = self.k.shape
            c.k, c.v = self.k.new_zeros(n_layer, B, H, max_len, hd), self.v.new_zeros(n_layer, B, H, max_len, hd)
            c.k[:, :, :, : self.pos], c.v[:, :, :, : self.pos] = self.k[:, :, :, : self.pos], self.v[:, :, :, : self.pos]
        if self.key_mask is not None:
            c.key_mask = torch.ones(self.batch_size, max_len, dtype=torch.bool, device=self.key_mask.device)
            c.key_mask[:, : self.pos] = self.key_mask[:, : self.pos]
            c.pad = self.pad.clone()
        c.prev_embedding = self.prev_embedding  # replaced, never written in place: sharing is safe
        c.prev_keys = dict(self.prev_keys)
        return c
