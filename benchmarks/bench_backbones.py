"""
The same alignment step on each backbone, side by side in one run: omni's GPT, the same weights
read from a nanochat checkpoint, and a Hugging Face Qwen3 of matched width and depth; then, per
backbone, what trains under `projector`, `projector+lora` and `projector+lm` (parameter count,
step time). Random weights and random Whisper-like states: this times the code, not the quality.
Prints numbers, asserts nothing. Step time = the fastest of a few repetitions (shared machine).

    python benchmarks/bench_backbones.py [--width 128] [--depth 2] [--batch 8] [--frames 150]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_hf_lm, tiny_nanochat  # noqa: E402  (the test suite's tiny-model writers)

from omni.model.gpt import GPT, GPTConfig  # noqa: E402
from omni.model.lm import LoraSpec, add_lora, load_lm  # noqa: E402
from omni.model.speech_lm import SpeechLM, SpeechLMConfig  # noqa: E402

TEXTS = ["it was a dark and stormy night and the rain fell in torrents", "holmes looked up from his chair",
         "the door opened", "i have no data yet it is a capital mistake to theorise before one has data"]


def make_step(model: SpeechLM, params: list[torch.nn.Parameter], hidden, lengths, texts):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(hidden, lengths, texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=150, help="Whisper frames per clip (3 s)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lora-rank", type=int, default=16)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-backbones-"))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=512, vocab_size=257, n_layer=args.depth, n_head=4, n_kv_head=2, n_embd=args.width))
    gpt.save(root / "omni")
    folders = {
        "omni": root / "omni",
        "nanochat": tiny_nanochat(root / "nanochat", n_embd=args.width, n_layer=args.depth, n_head=4, n_kv_head=2),
        "hf (Qwen3)": tiny_hf_lm(root / "hf", hidden=args.width, layers=args.depth),
    }
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, 1, args.frames, 384, generator=g)  # one Whisper state (layer "last"), tiny.en width
    lengths = torch.tensor([args.frames - 7 * i for i in range(args.batch)])
    texts = (TEXTS * args.batch)[: args.batch]
    print(f"threads {torch.get_num_threads()}, width {args.width}, depth {args.depth}, batch {args.batch}, "
          f"{args.frames} frames -> {args.frames // 4} audio tokens, LoRA rank {args.lora_rank}")
    runs = []  # (backbone, trainable, LM params, trained params, step)
    for name, folder in folders.items():
        for trainable in ("projector", "projector+lora", "projector+lm"):
            lm, tok = load_lm(folder)
            n_lm = sum(p.numel() for p in lm.parameters())
            for p in lm.parameters():
                p.requires_grad_(trainable == "projector+lm")
            extra = list(lm.parameters()) if trainable == "projector+lm" else []
            if trainable == "projector+lora":
                extra = list(add_lora(lm, LoraSpec(rank=args.lora_rank)).values())
            torch.manual_seed(0)
            model = SpeechLM(lm, tok, 1, 384, SpeechLMConfig(layer="last", k=4))
            params = list(model.projector.parameters()) + extra
            runs.append((name, trainable, n_lm, sum(p.numel() for p in params), make_step(model, params, hidden, lengths, texts)))
    # round-robin: every configuration is timed once per round, so the machine's load hits all alike;
    # each keeps its fastest step (the first round is warm-up)
    best = [float("inf")] * len(runs)
    for r in range(args.reps + 1):
        for i, run in enumerate(runs):
            t = run[4]()
            if r:
                best[i] = min(best[i], t)
    ref = best[0]
    print(f"{'backbone':<12} {'trainable':<16} {'LM params':>10} {'trained':>10} {'step ms':>8} {'vs omni projector':>18}")
    for (name, trainable, n_lm, trained, _), s in zip(runs, best):
        print(f"{name:<12} {trainable:<16} {n_lm:>10,} {trained:>10,} {1000 * s:>8.1f} {s / ref:>17.2f}x")


if __name__ == "__main__":
    main()
