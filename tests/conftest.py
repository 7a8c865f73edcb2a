import os
import tempfile
from pathlib import Path

import pytest

# MLflow writes go to a throwaway store, never the user's mlflow.db; umap's numba cache somewhere writable.
_TMP = Path(tempfile.mkdtemp(prefix="omni-tests-"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TMP / 'mlflow.db'}"
os.environ.setdefault("NUMBA_CACHE_DIR", str(_TMP / "numba"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def write_bad_clips(folder: Path) -> dict[str, tuple[Path, str]]:
    """One clip of each kind Whisper cannot take, tiny (16-bit PCM via omni.audio.save; float for NaN):
    name -> (path, what the reason says). 'missing' is not written."""
    import numpy as np
    import soundfile as sf

    from omni import audio

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    audio.save(folder / "silent.wav", np.zeros(8000))
    audio.save(folder / "dither.wav", rng.integers(-2, 3, 8000) / 32768)  # +-2 LSB: RMS -87 dBFS
    audio.save(folder / "short.wav", 0.1 * rng.standard_normal(audio.MIN_SAMPLES - 1))
    audio.save(folder / "long.wav", np.full(int(16000 * (audio.MAX_SECONDS + 0.5)), 0.1))
    nan = 0.1 * rng.standard_normal(8000).astype(np.float32)
    nan[10] = np.nan
    sf.write(str(folder / "nan.wav"), nan, 16000, subtype="FLOAT")
    sf.write(str(folder / "empty.wav"), np.zeros(0, np.float32), 16000)
    (folder / "junk.wav").write_bytes(b"RIFF\x00\x01garbage, not a wav file" * 10)
    reasons = {"silent": "silent", "dither": "silent", "short": "too short", "long": "longer than",
               "nan": "NaN/inf", "empty": "empty", "junk": "unreadable", "missing": "not found"}
    return {name: (folder / f"{name}.wav", reason) for name, reason in reasons.items()}


def mixed_manifest(path: Path, good: list[dict]) -> tuple[Path, dict[int, str]]:
    """A manifest of the good rows with one row per bad clip kind between them (bad clips written
    beside it); returns (manifest, {line: reason} of the bad rows)."""
    import json

    bad = list(write_bad_clips(path.parent / "bad").values())
    rows, expected = [], {}
    for i in range(max(len(good), len(bad))):
        if i < len(good):
            rows.append(good[i])
        if i < len(bad):
            rows.append({"audio": str(bad[i][0]), "text": f"bad {bad[i][0].stem}"})
            expected[len(rows)] = bad[i][1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, expected


@pytest.fixture
def repo() -> Path:
    return REPO


# --- a tiny alignment run, shared by tests/test_align.py and tests/test_cli.py -------------------
# 16 sentences -> 11 train, 1 val, 4 test + 4 test_seen_voice clips; the cache of their Whisper
# tiny.en states; a 1-layer random LM (bytes); a 10-step alignment with the learned layer mix.


def tiny_lm(path: Path, seed: int = 0) -> Path:
    """A random 1-layer GPT (byte tokenizer: no tokenizer.json) whose output depends on the audio
    prefix: GPT's own init keeps the residual branches near zero, so at init every clip would
    decode to the same text and a test comparing transcripts would compare nothing."""
    import torch

    from omni.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(sequence_len=256, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    with torch.no_grad():
        for block in gpt.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, 0.3)
            block.mlp.c_proj.weight.normal_(0.0, 0.3)
        gpt.lm_head.weight.normal_(0.0, 0.3)
    gpt.save(path)
    return path


@pytest.fixture(scope="session")
def tiny_alignment(tmp_path_factory):
    """SimpleNamespace(root, corpus, cache, lm, run, cfg, result): `run` is a report-style folder
    holding model/ (what `omni transcribe --run` takes); `result` the AlignResult."""
    from types import SimpleNamespace

    from omni.align import AlignConfig, prepare_cache, run_alignment
    from omni.data.synth import SynthConfig, build_corpus

    root = tmp_path_factory.mktemp("alignment")
    build_corpus(SynthConfig(out=str(root / "corpus"), n_sentences=16, min_words=3, max_words=6, test_fraction=0.25, workers=1))
    cfg = AlignConfig(corpus=str(root / "corpus"), features=str(root / "features"), lm=str(tiny_lm(root / "lm")),
                      layer="weighted", steps=10, eval_every=5, eval_clips=4, batch_size=8, max_new_tokens=12,
                      whisper_baseline=False, device="cpu", out=str(root / "run" / "model"))
    cache = prepare_cache(cfg)
    result = run_alignment(cfg, cache=cache)
    return SimpleNamespace(root=root, corpus=root / "corpus", cache=cache, lm=root / "lm", run=root / "run", cfg=cfg, result=result)
