import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

# MLflow writes go to a throwaway store, never the user's mlflow.db; umap's numba cache somewhere writable.
_TMP = Path(tempfile.mkdtemp(prefix="omni-tests-"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_TMP / 'mlflow.db'}"
os.environ.setdefault("NUMBA_CACHE_DIR", str(_TMP / "numba"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# Debian's headless Chromium, driven by Playwright (which never downloads a browser): tests/test_chat.py, test_browser.py
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NO_CHROMIUM = "no Chromium installed (apt-get install chromium; .ci/run does)"


def write_bad_clips(folder: Path) -> dict[str, tuple[Path, str]]:
    """One clip of each kind Whisper cannot take, tiny (16-bit PCM via omni.data.audio.save; float for NaN):
    name -> (path, what the reason says). 'missing' is not written."""
    import numpy as np
    import soundfile as sf

    from omni.data import audio

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
    audio.save(folder / "truncated.wav", 0.1 * rng.standard_normal(8000))
    whole = (folder / "truncated.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(whole[: 44 + 8000])  # cut inside its data: 4000 of 8000 frames
    reasons = {"silent": "silent", "dither": "silent", "short": "too short", "long": "longer than",
               "nan": "NaN/inf", "empty": "empty", "junk": "unreadable", "missing": "not found",
               "truncated": "truncated: the header promises 8000 frames (0.50 s), the file holds 4000 (0.25 s)"}
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


def _footprint() -> dict[str, int]:
    """What a test must never write: the repository's reports/, mlflow.db and MLflow's artifact folders
    (every file with its modification time)."""
    files = [p for d in ("reports", "mlartifacts", "mlruns") for p in (REPO / d).rglob("*") if p.is_file()]
    return {str(p.relative_to(REPO)): p.stat().st_mtime_ns for p in files + [REPO / "mlflow.db"] if p.exists()}


@pytest.fixture(scope="session", autouse=True)
def repository_left_alone():
    """Tests write into tmp paths only: a report folder left in the repository's reports/ would show up in
    the user's reports/index.html (and an MLflow run in their mlflow.db)."""
    before = _footprint()
    yield
    after = _footprint()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the tests wrote into the repository: {changed[:10]} (write under tmp_path)"


# --- notebooks under papermill's own CLI (tests/test_notebooks.py, test_params.py, test_layer_ablation.py, ...) ---


def papermill(notebook: str, executed: Path, env: dict, **values):
    """papermill's CLI as its docs show it (`-p NAME VALUE`; no omni runner, no run id unless given)."""
    import subprocess
    import sys

    assert "out_dir" in values, "give out_dir (a tmp path): a notebook's default writes into the repository's reports/"
    args = [a for k, v in values.items() for a in ("-p", k, str(v))]
    return subprocess.run([sys.executable, "-m", "papermill", f"notebooks/{notebook}", str(executed), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def notebook_project(tmp_path: Path, monkeypatch, notebook: str, experiment: str) -> Path:
    """A throwaway project to run `omni run` in: the working directory, its own MLflow store,
    notebooks/<name> holding `notebook` and exp.yaml holding `experiment` (which names it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = re.search(r"notebook: notebooks/(\S+)", experiment).group(1)
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / name).write_text(notebook)
    (tmp_path / "exp.yaml").write_text(experiment)
    return tmp_path


def papermill_env(db: Path) -> dict:
    """The environment of a papermill run logging into its own sqlite store `db`."""
    return os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{db}", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def only_run(db: Path, experiment: str):
    """The one MLflow run of `experiment` in the store `db`."""
    from omni import track

    old = os.environ["MLFLOW_TRACKING_URI"]
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    try:
        (run,) = track.client().search_runs([track.experiment_id(experiment)])
        return run
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = old


# --- a tiny alignment run, shared by tests/test_alignment.py and tests/test_cli.py -------------------
# 16 sentences -> 11 train, 1 val, 4 test + 4 test_seen_voice clips; the cache of their Whisper
# tiny.en states; a 1-layer random LM (bytes); a 10-step alignment with the learned layer mix.


def tiny_lm(path: Path, seed: int = 0, sequence_len: int = 256) -> Path:
    """A random 1-layer GPT (byte tokenizer: no tokenizer.json) whose output depends on the audio
    prefix: GPT's own init keeps the residual branches near zero, so at init every clip would
    decode to the same text and a test comparing transcripts would compare nothing."""
    import torch

    from omni.model.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(sequence_len=sequence_len, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
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

    from omni.data.synth import SynthConfig, build_corpus
    from omni.experiments import alignment
    from omni.experiments.alignment import AlignConfig, prepare_cache

    root = tmp_path_factory.mktemp("alignment")
    build_corpus(SynthConfig(out=str(root / "corpus"), sentences=16, min_words=3, max_words=6, test_fraction=0.25, workers=1))
    cfg = AlignConfig(corpus=str(root / "corpus"), features=str(root / "features"), lm=str(tiny_lm(root / "lm")),
                      layer="weighted", steps=10, eval_every=5, eval_clips=4, batch_size=8, max_new_tokens=12,
                      whisper_baseline=False, device="cpu", out=str(root / "run" / "model"))
    cache = prepare_cache(cfg)
    result = alignment.run(cfg, cache=cache)
    return SimpleNamespace(root=root, corpus=root / "corpus", cache=cache, lm=root / "lm", run=root / "run", cfg=cfg, result=result)


# --- tiny backbones of every kind omni.model.lm loads (tests/test_lm.py, test_lora.py, benchmarks) --------


def tiny_hf_lm(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, arch: str = "qwen3", bos: bool = False) -> Path:
    """A random Qwen3 or Llama (transformers' own classes, tiny config) + a byte-level BPE tokenizer with
    a chat template, saved with save_pretrained: what a local Hugging Face model folder looks like.
    bos: the tokenizer has a bos token of its own (<|endoftext|>), so BOS != EOS (<|im_end|>)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "Holmes said that it was a capital mistake"] * 4
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template,
                                   **({"bos_token": "<|endoftext|>"} if bos else {}))
    torch.manual_seed(seed)
    Config, Model = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    cfg = Config(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
                      initializer_range=0.2, tie_word_embeddings=False)
    Model(cfg).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


NANOCHAT_SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                     "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


def tiny_nanochat(base: Path, seed: int = 0, step: int = 10, n_embd: int = 32, n_layer: int = 1, n_head: int = 2, n_kv_head: int = 2) -> Path:
    """A nanochat checkpoint folder written the way nanochat writes one (checkpoint_manager.save_checkpoint
    and RustBPETokenizer.save, at commit ccf4b7f): <base>/base_checkpoints/d<n>/model_<step:06d>.pt
    (torch.save of the state dict, vocabulary padded to a multiple of 64, wte in bf16), meta_<step:06d>.json
    ({"model_config": ...}), and <base>/tokenizer/tokenizer.pkl (a pickled tiktoken Encoding).
    Weights come from a random omni GPT (same architecture); returns the checkpoint folder."""
    import json
    import pickle

    import tiktoken
    import torch

    from omni.model.gpt import GPT, GPTConfig

    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=r"\s+|\S+", mergeable_ranks=ranks,
                            special_tokens={s: 256 + i for i, s in enumerate(NANOCHAT_SPECIALS)})
    (base / "tokenizer").mkdir(parents=True, exist_ok=True)
    with open(base / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    V = enc.n_vocab
    model_config = dict(sequence_len=256, vocab_size=V, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**model_config))
    with torch.no_grad():
        for block in gpt.transformer.h:  # as tiny_lm: make the output depend on the input
            block.attn.c_proj.weight.normal_(0.0, 0.3)
            block.mlp.c_proj.weight.normal_(0.0, 0.3)
        gpt.lm_head.weight.normal_(0.0, 0.3)
    state = {k: v.clone() for k, v in gpt.state_dict().items()}
    padded = (V + 63) // 64 * 64
    for k in ("transformer.wte.weight", "lm_head.weight"):
        state[k] = torch.cat([state[k], torch.randn(padded - V, n_embd)])
    state["transformer.wte.weight"] = state["transformer.wte.weight"].bfloat16()
    ckpt = base / "base_checkpoints" / f"d{n_layer}"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(state, ckpt / f"model_{step:06d}.pt")
    (ckpt / f"meta_{step:06d}.json").write_text(json.dumps({"step": step, "val_bpb": 3.0, "model_config": model_config}, indent=2))
    return ckpt
