"""Choosing the next token: one rule for every backbone (omni's GPT, nanochat's, Hugging Face LMs).

Design choices:
- temperature 0 is greedy (argmax); otherwise top-k, then nucleus (top-p) filtering, then a draw
  from the caller's torch.Generator, so a seeded decode is reproducible.
- a row of a batch that has emitted the stop token keeps emitting it: the batch stays rectangular
  and the caller cuts each row at its first stop token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def next_tokens(
    logits: Tensor, done: Tensor, stop_token: int | None, temperature: float, top_k: int | None, top_p: float | None,
    gen: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """One decoding step for every backbone: (next tokens (B,), done (B,)). A row that emitted
    stop_token keeps emitting it (padding); without a stop token no row is ever done."""
    nxt = sample_next(logits, temperature, top_k, top_p, gen)
    if stop_token is not None:
        nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
        done = done | (nxt == stop_token)
    return nxt, done


def sample_next(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, gen: torch.Generator | None
) -> Tensor:
    """One token per row from (B, V) logits: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    V = logits.size(-1)
    k = V if top_k is None else min(top_k, V)
    nucleus = top_p is not None and top_p < 1.0
    if k == V and not nucleus:
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=gen).squeeze(1)
    # the k best, sorted: top-k keeps them, nucleus cuts their tail; the draw is among them alone
    # (a third of the cost of masking all V logits, which a chat pays for every token)
    kept, order = torch.topk(logits, k, dim=-1)
    if nucleus:
        probs = kept.softmax(dim=-1)
        # drop a token when the tokens before it already cover top_p; the most likely always stays
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        kept = kept.masked_fill(drop, float("-inf"))
    return order.gather(-1, torch.multinomial(kept.softmax(dim=-1), 1, generator=gen)).squeeze(1)


def stream_tokens(logits: Tensor, step: Callable[[Tensor], Tensor], max_new_tokens: int, stop_token: int | None, temperature: float,
                  top_k: int | None, top_p: float | None, gen: torch.Generator | None) -> Iterator[Tensor]:
    """The one decoding loop of every backbone: from the first position's logits (B, V), yield the next
    token of every row (B,), and ask `step(tokens)` for the logits after it, until every row stopped
    or max_new_tokens."""
    done = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
    for i in range(max_new_tokens):
        nxt, done = next_tokens(logits, done, stop_token, temperature, top_k, top_p, gen)
        yield nxt
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        logits = step(nxt)
