"""The yardstick: Whisper's own WER on the held-out split, greedy vs under the loop guard.

    python experiments/whisper_yardstick.py [--clips N] [--corpus data/synth] [--features cache/features] [--ship]

Decodes the first N held-out clips (split "test": unseen sentences, unseen voices; all of them by
default) with Whisper's own decoder twice, in chunks of 16 so that a stopped run leaves both
decodings on the same clips: greedy, and with openai-whisper's temperature fallback
(omni.model.speech_lm.LoopGuard's defaults: temperatures 0.0..1.0, compression ratio 2.4, mean log-prob
-1). Both are cached in the feature cache folder, where omni.experiments.alignment.run finds them, so a
later alignment run does not decode Whisper again. Prints, after each chunk, corpus and median
per-clip WER on clear speech (style "normal") and per style and variant, for both decodings, and
the guard's cost as a ratio of the two decoding times measured side by side (a cached clip costs
nothing: compare on a fresh cache; each timing includes loading Whisper, about a second).
--ship writes both decodings into omni/eval/baselines/ (keyed by each clip's SHA-1), the transcripts
the repo ships so that a fresh machine's alignment runs need not decode Whisper again.
"""

from __future__ import annotations

import argparse
import time

from omni.eval.yardstick import content_scores, score_table, ship_hyps, whisper_hyps
from omni.experiments.alignment import AlignConfig, prepare_cache
from omni.model.speech_lm import LoopGuard


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=0, help="first N held-out clips (0: all)")
    p.add_argument("--corpus", default=AlignConfig.corpus)
    p.add_argument("--features", default=AlignConfig.features)
    p.add_argument("--encoder", default=AlignConfig.encoder)
    p.add_argument("--ship", action="store_true", help="write the transcripts into omni/eval/baselines/ (the repo ships them)")
    args = p.parse_args()
    cfg = AlignConfig(corpus=args.corpus, features=args.features, encoder=args.encoder)
    cache = prepare_cache(cfg)
    test = cache.select(split="test")
    test = test[: args.clips] if args.clips else test
    systems = {"whisper": LoopGuard(seed=cfg.seed), "whisper_unguarded": None}
    seconds = dict.fromkeys(systems, 0.0)
    for end in range(16, len(test) + 16, 16):
        rows = test[:end]
        hyps = {}
        for name, guard in systems.items():
            t = time.perf_counter()
            hyps[name] = whisper_hyps(cache, rows, cfg.encoder, guard)
            seconds[name] += time.perf_counter() - t
        refs = [cache.rows[r]["text"] for r in rows]
        labels = [cache.rows[r]["labels"] for r in rows]
        s = content_scores(refs, hyps, labels)
        print(f"\n{len(rows)} held-out clips, {s['n_clear']:.0f} clear; decode seconds {seconds}")
        for name in systems:
            print(f"  {name:15s} all WER {s[f'{name}_wer']:.3f} (median {s[f'{name}_median_wer']:.3f})  "
                  f"clear WER {s.get(f'clear_{name}_wer', float('nan')):.3f} (median {s.get(f'clear_{name}_median_wer', float('nan')):.3f})")
        for r in score_table(refs, hyps, labels, by=("style", "variant")):
            if r["by"] != "all":
                print(f"  {r['by']}={r['group']:9s} n={r['n']:3.0f} {r['system']:15s} WER {r['wer']:.3f} (median {r['median_wer']:.3f})")
    if seconds["whisper_unguarded"] > 0:
        print(f"guard / greedy decoding time: {seconds['whisper'] / seconds['whisper_unguarded']:.1f}x")
    if args.ship:
        for name, guard in systems.items():
            print("shipped:", ship_hyps(cache, test, cfg.encoder, guard))


if __name__ == "__main__":
    main()
