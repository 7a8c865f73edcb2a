"""What the bad-clip checks cost next to encoding, side by side in one process.

    python benchmarks/bench_checks.py [--out data/synth] [--sentences 3000] [--encode 0]
    python benchmarks/bench_checks.py --manifest OTHER/data/synth/manifest.jsonl   (an existing corpus, read only)

On the default synthesized corpus (3,000 sentences -> 3,300 clips; built first if missing,
idempotently), per clip:
(a) header checks (read_manifest with check_content=False: JSON, fields, soundfile header);
(b) today's key pass (cache_key: read and hash every clip's bytes);
(c) the check-and-key pass build_features runs now (check_and_key: the same read, plus a decode
    from memory for NaN/inf, silence and length);
(d) a full read_manifest with content checks (what `omni transcribe` and the loaders pay);
(e) encoding (WhisperEncoder.encode, tiny.en, var, batch 8, audio.load included) on --encode clips
    (a seeded sample; 0 = all).
Prints seconds per 1,000 clips and the ratios (c - b) / e and (d - a) / e; asserts nothing about
timing. Passes run twice, the figure is the second (page cache warm, as in a rerun).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from omni.data import audio  # noqa: E402
from omni.data.features import cache_key, check_and_key, encoder_fingerprint  # noqa: E402
from omni.data.manifest import read_manifest  # noqa: E402
from omni.data.synth import SynthConfig, build_corpus  # noqa: E402
from omni.model.encoder import WhisperEncoder  # noqa: E402


def timed(fn, repeat: int = 2) -> float:
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/synth")
    p.add_argument("--sentences", type=int, default=SynthConfig.sentences)
    p.add_argument("--manifest", help="use this corpus as it is instead of building --out")
    p.add_argument("--encode", type=int, default=0, help="clips to encode (seeded sample); 0 = all")
    a = p.parse_args()
    manifest = Path(a.manifest) if a.manifest else build_corpus(SynthConfig(out=a.out, sentences=a.sentences)) / "manifest.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the corpus must be clean: a warning here is a bug
        examples = read_manifest(manifest, check_content=False).examples
    n = len(examples)
    seconds = sum(e.duration for e in examples)
    enc = WhisperEncoder.from_source("tiny.en")
    fp = encoder_fingerprint(enc)
    print(f"corpus {manifest}: {n} clips, {seconds / 3600:.2f} h; load {os.getloadavg()[0]:.2f}")

    t_head = timed(lambda: read_manifest(manifest, check_content=False))
    t_key = timed(lambda: cache_key(examples, fp, "var"))
    key, good, bad = check_and_key(examples, fp, "var")
    assert key == cache_key(examples, fp, "var") and not bad  # same key as before the checks
    t_check_key = timed(lambda: check_and_key(examples, fp, "var"))
    t_full = timed(lambda: read_manifest(manifest))

    sample = examples if a.encode <= 0 else random.Random(0).sample(examples, min(a.encode, n))
    t0 = time.perf_counter()
    for i in range(0, len(sample), 256):  # like build_features: one shard at a time
        enc.encode([audio.load(e.audio) for e in sample[i : i + 256]], mode="var", batch_size=8)
    t_enc = (time.perf_counter() - t0) * n / len(sample)

    per_k = lambda t: 1000 * t / n  # noqa: E731
    print(f"(a) header checks (read_manifest, no decode)   {per_k(t_head):8.2f} s / 1000 clips")
    print(f"(b) key pass before (read + hash)              {per_k(t_key):8.2f} s / 1000 clips")
    print(f"(c) check-and-key pass now (+ decode, checks)  {per_k(t_check_key):8.2f} s / 1000 clips")
    print(f"(d) read_manifest with content checks          {per_k(t_full):8.2f} s / 1000 clips")
    print(f"(e) encoding, tiny.en var, {len(sample)} clips          {per_k(t_enc):8.2f} s / 1000 clips")
    print(f"added by the checks in build_features: (c - b) / e = {(t_check_key - t_key) / t_enc:.4f}")
    print(f"whole check pass of build_features:   (a + c) / e = {(t_head + t_check_key) / t_enc:.4f}")
    print(f"read_manifest with content checks:        d / e = {t_full / t_enc:.4f}")
    print(f"projected for the corpus: checks {t_head + t_check_key - t_key:.1f} s added, encoding {t_enc:.1f} s")


if __name__ == "__main__":
    main()
