"""Data path costs, measured side by side in one process on one small synthesized corpus.

    python benchmarks/bench_data.py [--sentences 55] [--big 220] [--batch-size 8] [--epochs 3]

(a) synthesis clips/s with 1 vs 2 worker processes, the same plan rendered into fresh folders
    (interleaved 1, 2, 1, 2 so both see the same machine load). The whole build_corpus call
    includes starting the spawn pool (each worker imports torch), which a small plan cannot
    amortise, so a bigger plan (--big sentences) is rendered too: the marginal rate
    (extra clips / extra seconds between the two plans) is the throughput without that fixed cost;
(b) feature extraction clips/s, build_features in mode var vs pad30 on that corpus (the whole call:
    encoder load, hashing, audio loading, encoding, writing; and the encoder alone);
(c) one training epoch from the cache vs the same epoch encoding on the fly: the same batches
    (length-bucketed, batch 8), each a projector forward + backward + AdamW step on the last
    state; on the fly = audio.load + WhisperEncoder.encode (var) per batch, then the same step.
    The cache epoch reads its states from disk every epoch (FeatureCache.batches without `states`).
    Target: >= 10x faster from the cache. Also the padding fraction of those batches vs random ones;
(d) cache size per hour of audio: bytes on disk / hours in the manifest, and the arithmetic
    (n_states x d_model x 2 bytes x 50 frames/s x 3600 s) for tiny.en and whisper-base.
Prints figures and ratios; asserts nothing about timing. OMP_WAIT_POLICY defaults to PASSIVE (set
before torch loads; see bench_encoder.py for why); torch's thread count is its default unless --threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from omni.data import audio  # noqa: E402
from omni.data import features  # noqa: E402
from omni.data.features import FeatureCache, build_features  # noqa: E402
from omni.data.synth import SynthConfig, build_corpus  # noqa: E402
from omni.model import mel  # noqa: E402
from omni.model.encoder import LayerSelect, WhisperEncoder  # noqa: E402
from omni.model.encoder import collate_states  # noqa: E402
from omni.model.projector import Projector, ProjectorConfig  # noqa: E402

FRAMES_PER_S = mel.SAMPLE_RATE / mel.HOP_LENGTH / 2  # 50 encoder frames per second


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


class EncodeTimer:
    """Accumulates the wall time spent in WhisperEncoder.encode (wrapped in place)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.real = WhisperEncoder.encode

    def __enter__(self):
        timer = self

        def timed(enc, *a, **k):
            t0 = time.perf_counter()
            try:
                return timer.real(enc, *a, **k)
            finally:
                timer.seconds += time.perf_counter() - t0

        WhisperEncoder.encode = timed
        return self

    def __exit__(self, *exc) -> None:
        WhisperEncoder.encode = self.real


def padding(batches: list[list[int]]) -> float:
    return 1 - sum(map(sum, batches)) / sum(len(b) * max(b) for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=55, help="corpus plan size (~1.1 clips per sentence)")
    ap.add_argument("--big", type=int, default=220, help="bigger plan for (a)'s marginal rate (0: skip)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3, help="cache epochs timed (on the fly: 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in this process (0 = default)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary corpora and caches")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average {load()}, tmp {tmp}")

    # (a) synthesis ---------------------------------------------------------------------------
    def synth(n: int, workers: int, name: str) -> tuple[Path, int, float]:
        t0 = time.perf_counter()
        out = build_corpus(SynthConfig(out=str(tmp / name), sentences=n, workers=workers))
        return out, sum(1 for _ in (out / "clips").glob("*.wav")), time.perf_counter() - t0

    times: dict[int, list[float]] = {1: [], 2: []}
    corpus = None
    for rep in range(2):
        for workers in (1, 2):
            out, n_clips, dt = synth(args.sentences, workers, f"synth_w{workers}_{rep}")
            times[workers].append(dt)
            corpus = corpus or out
    seconds = [sf.info(str(p)).duration for p in (corpus / "clips").glob("*.wav")]
    hours = sum(seconds) / 3600
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    print(f"\n(a) synthesis, {n_clips} clips ({sum(seconds):.0f} s of audio, mean {statistics.mean(seconds):.2f} s), "
          f"whole build_corpus call incl. manifests:")
    for w, t in ((1, t1), (2, t2)):
        print(f"    {w} worker{'s' if w > 1 else ' '}: {n_clips / t:6.1f} clips/s  "
              f"(runs: {', '.join(f'{n_clips / x:.1f}' for x in times[w])} clips/s)")
    print(f"    2 vs 1 workers: {t1 / t2:.2f}x   [{load()}]")
    if args.big:
        marg = {}
        for workers in (1, 2):
            _, n_big, dt = synth(args.big, workers, f"synth_big_w{workers}")
            marg[workers] = (n_big - n_clips) / (dt - statistics.median(times[workers]))
            print(f"    {n_big} clips, {workers} worker{'s' if workers > 1 else ' '}: {n_big / dt:6.1f} clips/s whole call; "
                  f"marginal {marg[workers]:6.1f} clips/s, so ~{dt - n_big / marg[workers]:.1f} s fixed cost")
        print(f"    2 vs 1 workers, marginal rate: {marg[2] / marg[1]:.2f}x   [{load()}]")

    # (b) feature extraction ------------------------------------------------------------------
    manifest = corpus / "manifest.jsonl"
    t0 = time.perf_counter()
    enc = WhisperEncoder.from_source("tiny.en")
    load_s = time.perf_counter() - t0
    build: dict[str, tuple[float, float, Path]] = {}
    for mode in ("var", "pad30"):
        with EncodeTimer() as timer:
            t0 = time.perf_counter()
            path = build_features(manifest, tmp / f"features_{mode}", "tiny.en", mode=mode, progress=False)
            build[mode] = (time.perf_counter() - t0, timer.seconds, path)
    print(f"\n(b) feature extraction, build_features on the same {n_clips} clips (tiny.en, batch 8; "
          f"encoder load alone {load_s:.2f} s):")
    for mode, (total, encode_s, _) in build.items():
        print(f"    {mode:5s}: {n_clips / total:6.1f} clips/s whole call ({total:.1f} s), "
              f"{n_clips / encode_s:6.1f} clips/s encoder alone ({encode_s:.1f} s)")
    print(f"    var vs pad30: {build['pad30'][0] / build['var'][0]:.1f}x (whole call), "
          f"{build['pad30'][1] / build['var'][1]:.1f}x (encoder)   [{load()}]")
    t0 = time.perf_counter()
    again = build_features(manifest, tmp / "features_var", "tiny.en", mode="var", progress=False)
    print(f"    second call on an up-to-date cache: {time.perf_counter() - t0:.2f} s (same folder: {again == build['var'][2]})")

    # (c) one epoch: cache vs on the fly ------------------------------------------------------
    cache = FeatureCache.open(build["var"][2])
    rows = list(range(len(cache)))
    last = cache.n_states - 1
    torch.manual_seed(0)
    select = LayerSelect("last", cache.n_states)
    proj = Projector(ProjectorConfig(d_in=cache.d_model, d_out=384, k=4))
    opt = torch.optim.AdamW(proj.parameters(), lr=1e-3)

    def step(frames: torch.Tensor, lengths: torch.Tensor) -> None:
        y, _ = proj(frames, lengths)
        loss = y.sum(-1).pow(2).mean()  # any scalar that depends on every output
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def epoch_cache(seed: int) -> list[list[dict]]:
        groups = []
        for hidden, lengths, rs in cache.batches(rows, args.batch_size, layers=[last], seed=seed):
            step(hidden[:, 0], lengths)
            groups.append(rs)
        return groups

    # warm-up (page cache, allocator), and the batch composition the on-the-fly epoch reuses
    groups = [[cache.rows.index(r) for r in rs] for rs in epoch_cache(0)]

    def epoch_fly() -> None:
        for g in groups:
            waves = [audio.load(cache.rows[i]["audio"]) for i in g]
            hidden, lengths = collate_states(enc.encode(waves, mode="var", batch_size=args.batch_size))
            step(select(hidden), lengths)

    t_cache, t_fly = [], []
    for e in range(max(args.epochs, 2)):
        t0 = time.perf_counter()
        epoch_cache(e + 1)
        t_cache.append(time.perf_counter() - t0)
        if e < 2:
            t0 = time.perf_counter()
            epoch_fly()
            t_fly.append(time.perf_counter() - t0)
    c, f = statistics.median(t_cache), statistics.median(t_fly)
    print(f"\n(c) one epoch = {len(groups)} batches of <= {args.batch_size} ({n_clips} clips), projector "
          f"(stack k=4, {sum(p.numel() for p in proj.parameters()) / 1e6:.2f}M params) fwd+bwd+AdamW on the last state:")
    print(f"    from the cache : {c * 1e3:7.0f} ms/epoch, {n_clips / c:7.0f} clips/s  (epochs: {', '.join(f'{t * 1e3:.0f}' for t in t_cache)} ms)")
    print(f"    on the fly     : {f * 1e3:7.0f} ms/epoch, {n_clips / f:7.0f} clips/s  (epochs: {', '.join(f'{t * 1e3:.0f}' for t in t_fly)} ms)")
    print(f"    cache vs on the fly: {f / c:.1f}x faster (target >= 10x)   [{load()}]")
    frames = [r["frames"] for r in cache.rows]
    bucketed = padding([[frames[i] for i in g] for g in groups])
    rng = random.Random(0)
    rand = []
    for _ in range(200):
        order = rng.sample(frames, len(frames))
        rand.append(padding([order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]))
    print(f"    padding fraction of those batches: {bucketed:.3f} bucketed by length vs {statistics.mean(rand):.3f} "
          f"random batching (mean of 200 shuffles)")

    # (d) cache size --------------------------------------------------------------------------
    folder = build["var"][2]
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    shards = sum(p.stat().st_size for p in folder.glob("shard_*.safetensors"))
    per_hour = on_disk / hours
    tiny = cache.n_states * cache.d_model * 2 * FRAMES_PER_S * 3600
    base = 7 * 512 * 2 * FRAMES_PER_S * 3600
    print(f"\n(d) cache size: {on_disk / 1e6:.1f} MB on disk ({shards / 1e6:.1f} MB shards + index) for {hours * 60:.1f} min of audio")
    print(f"    measured, tiny.en ({cache.n_states} states x {cache.d_model}, float16): {per_hour / 1e9:.3f} GB per hour of audio")
    print(f"    arithmetic, tiny.en: {cache.n_states} x {cache.d_model} x 2 B x {FRAMES_PER_S:.0f} frames/s x 3600 s = {tiny / 1e9:.3f} GB/hour "
          f"(measured / arithmetic = {per_hour / tiny:.3f})")
    print(f"    arithmetic, whisper-base: 7 x 512 x 2 B x 50 x 3600 = {base / 1e9:.3f} GB/hour ({base / tiny:.2f}x tiny.en); "
          f"the full 3000-clip default corpus would hold ~{base / 3600 * statistics.mean(seconds) * 3300 / 1e9:.1f} GB")
    print(f"\nload average at the end {load()}", file=sys.stdout)
    if not args.keep:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
