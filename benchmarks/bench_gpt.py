"""
Time the GPT on this machine: a training step (forward + backward) with an audio prefix, and
generation with and without the KV cache. Prints numbers, asserts nothing.

    python benchmarks/bench_gpt.py [--depth 6] [--batch 5] [--text 120] [--audio 64] [--new 64]
"""

import argparse
import time

import torch

from omni.model.gpt import GPT, GPTConfig


def timeit(fn, warmup: int = 1, reps: int = 5) -> float:
    # the fastest of `reps`: on a shared machine the others measure the neighbours, not the code
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=257)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--text", type=int, default=120)
    ap.add_argument("--audio", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=args.vocab)).to(dev)
    B, T, A = args.batch, args.text, args.audio
    print(f"device {dev}, threads {torch.get_num_threads()}, depth {args.depth} (n_embd {model.config.n_embd}), "
          f"{model.num_params() / 1e6:.1f}M params, vocab {args.vocab}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    idx = torch.randint(0, args.vocab, (B, T), device=dev)
    audio = torch.randn(B, A, model.config.n_embd, device=dev, requires_grad=True)
    mask = torch.ones(B, A, dtype=torch.bool, device=dev)
    mask[0, : A // 2] = False  # one shorter prefix: exercises the masked (non-is_causal) path

    def step(audio_mask):
        with amp:
            loss = model(idx, targets=idx, audio=audio, audio_mask=audio_mask)
        loss.backward()
        sync()

    for name, m in [("no padding (is_causal)", None), ("left-padded prefix (mask)", mask)]:
        dt = timeit(lambda: step(m))
        print(f"fwd+bwd B={B} x (audio {A} + text {T}), {name}: {dt * 1e3:.0f} ms/step, "
              f"{B * (A + T) / dt:.0f} positions/s, {B * T / dt:.0f} text tokens/s")

    bos = torch.zeros(B, 1, dtype=torch.long, device=dev)
    with torch.no_grad():
        for use_cache in (True, False):
            def gen():
                with amp:
                    model.generate(bos, audio=audio, audio_mask=mask, max_new_tokens=args.new, use_cache=use_cache)
                sync()
            dt = timeit(gen, warmup=1, reps=2)
            print(f"generate B={B}, audio {A}, {args.new} new tokens, use_cache={use_cache}: "
                  f"{dt:.2f} s, {B * args.new / dt:.0f} tokens/s")


if __name__ == "__main__":
    main()
