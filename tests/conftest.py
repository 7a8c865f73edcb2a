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
