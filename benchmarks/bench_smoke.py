"""Wall time of the smoke experiment on this machine, broken down by stage.

    python benchmarks/bench_smoke.py [--steps 50] [--control shuffle] [--device cpu]

Runs omni.experiments.smoke.run with its defaults (5 clips, depth-6 random GPT, 50 full-batch steps, then
the same 50 steps as the shuffled-audio control) once, and prints: encode (encoder load + Whisper
on the 5 clips), train real, train control, decode (greedy transcripts after each training), the
rest (clip check, model construction), and seconds per optimiser step. The seed's figure was
~1 s for the whole experiment on a desktop GPU. Prints figures; asserts nothing about timing.
OMP_WAIT_POLICY defaults to PASSIVE (set before torch loads); torch threads: its default unless --threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from omni.experiments import smoke  # noqa: E402
from omni.experiments.smoke import SmokeConfig  # noqa: E402
from omni.model.speech_lm import SpeechLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=SmokeConfig.steps)
    ap.add_argument("--control", default=SmokeConfig.control)
    ap.add_argument("--device", default=SmokeConfig.device)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(REPO)  # the smoke manifest's default path is relative to the repository
    cfg = SmokeConfig(steps=args.steps, control=args.control, device=args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"smoke: {cfg.steps} steps + control={cfg.control}, depth {cfg.depth}, layer {cfg.layer}, k {cfg.k}, "
          f"encoder {cfg.encoder} ({cfg.encoder_mode}), device {cfg.device}")

    decode: list[float] = []
    real_transcribe = SpeechLM.transcribe

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return real_transcribe(self, *a, **k)
        finally:
            decode.append(time.perf_counter() - t0)

    SpeechLM.transcribe = timed
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        res = smoke.run(cfg)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        SpeechLM.transcribe = real_transcribe

    parts = {
        "encode (load encoder + Whisper on the clips)": res.encode_seconds,
        "train real": res.real.seconds,
        "train control": res.control.seconds if res.control else 0.0,
        "decode real": decode[0] if decode else 0.0,
        "decode control": decode[1] if len(decode) > 1 else 0.0,
    }
    parts["rest (clip check, model construction, ...)"] = total - sum(parts.values())
    print(f"\nwall time {total:.2f} s (the seed's figure: ~1 s on a desktop GPU); CPU time of this process "
          f"{cpu:.1f} s = {cpu / total:.2f} cores busy on average, with {torch.get_num_threads()} torch threads")
    for name, s in parts.items():
        print(f"  {name:44s} {s:7.2f} s  {100 * s / total:5.1f}%")
    steps = len(res.real.loss)
    print(f"seconds per step: {res.real.seconds / steps:.3f} (real), "
          f"{res.control.seconds / len(res.control.loss):.3f} (control)" if res.control else "")
    print(f"result: loss {res.real.loss[0]:.3f} -> {res.real.loss[-1]:.3f} (drop {res.loss_drop:.3f}, "
          f"passed {res.passed}), control gap {res.control_gap:.3f}, caption accuracy {res.caption_accuracy:.2f} "
          f"(control {res.control_caption_accuracy:.2f})")
    print(f"load average at the end {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
