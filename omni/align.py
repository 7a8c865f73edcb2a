"""Alignment: freeze Whisper and a pretrained LM, train only the audio path (layer choice + projector).

With the LM frozen, the projector's gradient is the only way to a lower loss: what the loss and
the WER measure is how much of the audio the projector carries into the LM's embedding space.
Whisper's own decoder, on the same held-out clips, is the yardstick.

Design choices:
- Data comes from the feature cache (omni.data.features): Whisper never runs during training.
  The corpus and the cache are built on first use, idempotently.
- Held-out evaluation is on split "test" of the synthesized corpus: sentences AND voices never
  seen in training (omni.data.synth). `test_seen_voice` (same sentences, seen voices) is scored
  too, to separate sentence from voice generalisation.
- One text normalisation (omni.metrics.normalize_text) for every system compared.
- The control decodes the held-out clips with their audio shuffled between clips: if the
  transcripts came from the LM's prior rather than the audio, the control's WER would be as good.
- Whisper's own WER is cached next to the features (it does not depend on anything trained here).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from omni import metrics
from omni.common import derangement, file_lock
from omni.data.features import FeatureCache, build_features
from omni.gpt import GPT
from omni.speech_lm import SpeechLM, SpeechLMConfig, collate_states
from omni.tokenizer import ByteTokenizer, load_tokenizer
from omni.track import NullTracker, Tracker
from omni.train import History, TrainConfig, pick_device, train


@dataclass
class AlignConfig:
    corpus: str = "data/synth"  # synthesized corpus folder (built if missing)
    sentences: int = 3000  # corpus size when it has to be built
    features: str = "cache/features"  # feature cache root
    encoder: str = "tiny.en"  # Whisper source
    encoder_mode: str = "var"  # var | pad30
    lm: str = "runs/lm"  # pretrained LM folder (omni.pretrain); pretrained with defaults if missing
    layer: str = "last"  # last | middle | <index> | weighted | weighted_ln
    k: int = 4  # frames per audio token
    projector: str = "stack"  # stack | conv | avg
    prompt: str = ""  # e.g. "Transcribe:"
    prompt_position: str = "after"  # before | after the audio
    trainable: str = "projector"  # projector (frozen LM: the research setting) | projector+lm (diagnostic: is the frozen LM the limit?)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    eval_every: int = 250  # steps between held-out evaluations (the WER-vs-steps curve)
    eval_clips: int = 100  # held-out clips decoded at each intermediate evaluation
    max_new_tokens: int = 80
    seed: int = 0
    device: str = "auto"
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs float32
    whisper_baseline: bool = True  # also decode the held-out clips with Whisper's own decoder
    out: str = ""  # checkpoint folder (audio path weights, resume state); "" = none


@dataclass
class AlignResult:
    config: AlignConfig
    history: History
    model: SpeechLM
    test: dict  # {"refs", "hyps", "rows", "control_hyps", "whisper_hyps"}
    scores: dict[str, float]
    layer_weights_history: list[list[float]] = field(default_factory=list)
    wer_curve: list[tuple[int, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return dict(self.scores)


def prepare_cache(cfg: AlignConfig, progress: bool = True) -> FeatureCache:
    """The synthesized corpus and its feature cache, built on first use (both idempotent; an existing
    corpus is used as it is). Safe from parallel grid workers: the first holds a lock while it
    builds, the others wait and then find everything in place."""
    from omni.data.synth import SynthConfig, build_corpus

    corpus = Path(cfg.corpus)
    with file_lock(corpus.parent / f".{corpus.name}.prepare.lock"):
        if not (corpus / "manifest.jsonl").exists():
            build_corpus(SynthConfig(out=str(corpus), n_sentences=cfg.sentences, seed=0))
        return FeatureCache.open(build_features(corpus / "manifest.jsonl", cfg.features, cfg.encoder, mode=cfg.encoder_mode, progress=progress))


def load_lm(path: str | Path, device: torch.device) -> tuple[GPT, object]:
    """An LM folder holds GPT.save()'s config.json + model.safetensors, and tokenizer.json (BPE) or none (bytes)."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: no pretrained LM here (run `omni run experiments/pretrain_lm.yaml`)")
    gpt = GPT.load(path, device=device)
    tok = load_tokenizer(str(path / "tokenizer.json")) if (path / "tokenizer.json").exists() else ByteTokenizer()
    return gpt, tok


def ensure_lm(cfg: AlignConfig, device: torch.device) -> tuple[GPT, object]:
    if not (Path(cfg.lm) / "model.safetensors").exists():
        from omni.pretrain import PretrainConfig, pretrain

        print(f"no LM at {cfg.lm}: pretraining one with the defaults of omni.pretrain")
        pretrain(PretrainConfig(out=cfg.lm, device=str(device)))
    return load_lm(cfg.lm, device)


def decode(model: SpeechLM, cache: FeatureCache, rows: list[int], states: list[torch.Tensor], batch_size: int, max_new_tokens: int, shuffle_seed: int | None = None) -> list[str]:
    """Greedy transcripts of `rows`, in order. shuffle_seed: give each clip another clip's audio
    (a seeded derangement: with two or more clips, no clip keeps its own)."""
    device = model.gpt_device
    order = list(range(len(rows))) if shuffle_seed is None else derangement(len(rows), shuffle_seed)
    hyps = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = order[i : i + batch_size]
        hidden, lengths = collate_states([states[j].float() for j in chunk])
        hyps += model.transcribe(hidden.to(device), lengths.to(device), max_new_tokens=max_new_tokens)
    return hyps


@torch.no_grad()
def held_out_loss(model: SpeechLM, cache: FeatureCache, rows: list[int], states: list[torch.Tensor], batch_size: int) -> float:
    device = model.gpt_device
    total, n = 0.0, 0
    for i in range(0, len(rows), batch_size):
        hidden, lengths = collate_states([s.float() for s in states[i : i + batch_size]])
        texts = [cache.rows[r]["text"] for r in rows[i : i + batch_size]]
        total += model(hidden.to(device), lengths.to(device), texts).item() * len(texts)
        n += len(texts)
    return total / max(n, 1)


def whisper_hyps(cache: FeatureCache, rows: list[int], encoder: str) -> list[str]:
    """Whisper's own greedy transcripts of `rows`, cached in the feature cache folder, keyed by the
    clip's audio path (not its row number: a view of the cache, e.g. omni.ablation.subset, numbers
    its rows differently but shares the folder)."""
    import os

    from omni import audio
    from omni.encoder import load_whisper_model, whisper_transcribe

    f = cache.path / f"whisper_hyps.{encoder.replace('/', '_')}.json"
    have = json.loads(f.read_text()) if f.exists() else {}
    todo = [r for r in rows if cache.rows[r]["audio"] not in have]
    if todo:
        model, processor = load_whisper_model(encoder)
        waves = [audio.load(cache.rows[r]["audio"]) for r in todo]
        for r, h in zip(todo, whisper_transcribe(model, processor, waves)):
            have[cache.rows[r]["audio"]] = h
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")  # atomic: a reader never sees half a file
        tmp.write_text(json.dumps(have))
        os.replace(tmp, f)
    return [have[cache.rows[r]["audio"]] for r in rows]


TRAINABLE = ("projector", "projector+lm")


def check_config(cfg: AlignConfig, n_states: int | None = None) -> None:
    """The audio path's parameters, checked before minutes go into a corpus, a cache or an LM.
    Without n_states the layer is checked by name only (its range needs the encoder)."""
    from omni.encoder import LayerSelect
    from omni.projector import Projector, ProjectorConfig
    from omni.speech_lm import PROMPT_POSITIONS

    if cfg.trainable not in TRAINABLE:
        raise ValueError(f"trainable {cfg.trainable!r} is not one of {TRAINABLE} (parameter `trainable`)")
    if cfg.prompt_position not in PROMPT_POSITIONS:
        raise ValueError(f"prompt_position {cfg.prompt_position!r} is not one of {PROMPT_POSITIONS} (parameter `prompt_position`)")
    Projector(ProjectorConfig(d_in=1, d_out=1, k=cfg.k, kind=cfg.projector))  # raises naming `projector` or `k`
    LayerSelect(cfg.layer, n_states if n_states is not None else 1 << 16)  # raises naming `layer`


def run_alignment(cfg: AlignConfig, tracker: Tracker | NullTracker | None = None, cache: FeatureCache | None = None) -> AlignResult:
    tracker = tracker or NullTracker()
    device = pick_device(cfg.device)
    check_config(cfg)
    cache = cache or prepare_cache(cfg)
    check_config(cfg, cache.n_states)
    gpt, tok = ensure_lm(cfg, device)
    train_lm = cfg.trainable == "projector+lm"
    for p in gpt.parameters():
        p.requires_grad_(train_lm)  # frozen LM (default): only the audio path trains
    torch.manual_seed(cfg.seed)
    model = SpeechLM(gpt, tok, cache.n_states, cache.d_model, SpeechLMConfig(cfg.layer, cfg.k, cfg.projector, cfg.prompt, cfg.prompt_position)).to(device)
    model.gpt.train(train_lm)

    train_rows = cache.select(split="train")
    test_rows = cache.select(split="test")
    seen_rows = cache.select(split="test_seen_voice")
    if not train_rows or not test_rows:
        raise ValueError(f"{cache.path}: the corpus needs `train` and `test` splits (labels.split)")
    t0 = time.perf_counter()
    train_states = cache.load_states(train_rows)
    test_states = cache.load_states(test_rows)
    load_seconds = time.perf_counter() - t0
    eval_idx = list(range(min(cfg.eval_clips, len(test_rows))))

    epoch = {"n": 0, "it": None}

    def next_batch():
        while True:
            if epoch["it"] is None:
                epoch["it"] = cache.batches(train_rows, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch["n"], states=train_states)
            try:
                return next(epoch["it"])
            except StopIteration:
                epoch["n"] += 1
                epoch["it"] = None

    def loss_fn(step: int):
        hidden, lengths, rows = next_batch()
        texts = [r["text"] for r in rows]
        n_tokens = sum(len(tok.encode(t)) + 1 for t in texts)
        return model(hidden.to(device), lengths.to(device), texts), n_tokens

    weights_history: list[list[float]] = []
    wer_curve: list[tuple[int, float]] = []

    def eval_fn(step: int) -> dict[str, float]:
        rows = [test_rows[i] for i in eval_idx]
        hyps = decode(model, cache, rows, [test_states[i] for i in eval_idx], cfg.batch_size, cfg.max_new_tokens)
        refs = [cache.rows[r]["text"] for r in rows]
        loss = held_out_loss(model, cache, rows, [test_states[i] for i in eval_idx], cfg.batch_size)
        model.projector.train()
        model.select.train()
        w = metrics.wer(refs, hyps)
        wer_curve.append((step + 1, w))
        weights_history.append(model.select.layer_weights().tolist())
        out = {"eval_loss": loss, "eval_wer": w}
        for i, v in enumerate(weights_history[-1]):
            out[f"layer_weight.{i}"] = v
        return out

    params = {f"select.{n}": p for n, p in model.select.named_parameters()}
    params |= {f"projector.{n}": p for n, p in model.projector.named_parameters()}
    if train_lm:
        params |= {f"gpt.{n}": p for n, p in model.gpt.named_parameters()}
    tcfg = TrainConfig(
        steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, dtype=cfg.dtype, eval_every=cfg.eval_every,
        ckpt_every=cfg.eval_every if cfg.out else 0, ckpt_dir=str(Path(cfg.out) / "resume") if cfg.out else "",
    )
    hist = train(params, loss_fn, tcfg, tracker, eval_fn=eval_fn)

    # final: the whole held-out split, the shuffled-audio control, Whisper's own decoder
    refs = [cache.rows[r]["text"] for r in test_rows]
    t1 = time.perf_counter()
    hyps = decode(model, cache, test_rows, test_states, cfg.batch_size, cfg.max_new_tokens)
    decode_seconds = time.perf_counter() - t1
    control = decode(model, cache, test_rows, test_states, cfg.batch_size, cfg.max_new_tokens, shuffle_seed=cfg.seed + 7)
    scores = {
        "test_loss": held_out_loss(model, cache, test_rows, test_states, cfg.batch_size),
        "wer": metrics.wer(refs, hyps),
        "cer": metrics.cer(refs, hyps),
        "control_wer": metrics.wer(refs, control),
        "train_seconds": hist.seconds,
        "load_seconds": load_seconds,
        "decode_seconds_per_clip": decode_seconds / len(test_rows),
        "tokens_per_s": sum(hist.tokens_per_s[1:]) / max(1, len(hist.tokens_per_s) - 1),
        "step_seconds": hist.seconds / max(1, len(hist.loss)),
        "skipped_steps": hist.skipped,
        "n_train": len(train_rows),
        "n_test": len(test_rows),
    }
    best = min(hist.evals, key=lambda e: e["eval_loss"]) if hist.evals else None
    if best:
        scores["best_eval_step"] = best["step"] + 1
        scores["seconds_to_best"] = hist.seconds * (best["step"] + 1) / max(1, cfg.steps)
    test = {"refs": refs, "hyps": hyps, "control_hyps": control, "rows": [cache.rows[r] for r in test_rows]}
    if seen_rows:
        seen_states = cache.load_states(seen_rows)
        seen_hyps = decode(model, cache, seen_rows, seen_states, cfg.batch_size, cfg.max_new_tokens)
        scores["wer_seen_voice"] = metrics.wer([cache.rows[r]["text"] for r in seen_rows], seen_hyps)
    if cfg.whisper_baseline:
        test["whisper_hyps"] = whisper_hyps(cache, test_rows, cfg.encoder)
        scores["whisper_wer"] = metrics.wer(refs, test["whisper_hyps"])
        scores["whisper_cer"] = metrics.cer(refs, test["whisper_hyps"])
    tracker.log_metrics(scores, step=cfg.steps)
    tracker.flush()  # the tracker buffers: unflushed, the final scores never reach MLflow
    if cfg.out:
        model.save_audio_path(cfg.out)
        meta = json.loads((Path(cfg.out) / "audio_path.json").read_text())
        lm_dir = Path(cfg.lm)
        if train_lm:  # the LM changed too: the run carries its own copy, so `omni transcribe` uses it
            lm_dir = Path(cfg.out) / "lm"
            model.gpt.save(lm_dir)
            if (Path(cfg.lm) / "tokenizer.json").exists():
                shutil.copy(Path(cfg.lm) / "tokenizer.json", lm_dir / "tokenizer.json")
        meta |= {"lm": str(lm_dir.resolve()), "encoder": cfg.encoder, "encoder_mode": cfg.encoder_mode, "align": asdict(cfg)}
        (Path(cfg.out) / "audio_path.json").write_text(json.dumps(meta, indent=2))
        tracker.log_artifact(cfg.out, artifact_path="model")
    return AlignResult(cfg, hist, model, test, scores, weights_history, wer_curve)


def load_aligned(run: str | Path, device: str = "cpu") -> tuple[SpeechLM, "WhisperEncoder", str]:  # noqa: F821
    """(model, encoder, encoder_mode) from an alignment run (omni.runs.load_run: a folder, a report
    folder holding model/, or an MLflow run id), with the Whisper encoder it was trained on."""
    from omni.encoder import WhisperEncoder
    from omni.runs import load_run

    model, meta = load_run(run, device, name="--run")
    encoder = WhisperEncoder.from_source(meta["encoder"], device=model.gpt_device)
    return model, encoder, meta.get("encoder_mode", "var")


@torch.no_grad()
def transcribe_waves(model: SpeechLM, encoder, waves: list[torch.Tensor], mode: str = "var", batch_size: int = 16, max_new_tokens: int = 120) -> list[str]:
    """Audio in, text out: encoder -> layer choice -> projector -> greedy decoding."""
    out = []
    device = model.gpt_device
    for i in range(0, len(waves), batch_size):
        states = encoder.encode([w.to(device) for w in waves[i : i + batch_size]], mode=mode, batch_size=batch_size)
        hidden, lengths = collate_states(states)
        out += model.transcribe(hidden.to(device), lengths.to(device), max_new_tokens=max_new_tokens)
    return out
