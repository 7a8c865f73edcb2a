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
- The final held-out decode of every system (ours, the control, Whisper) is scored by omni.yardstick:
  under the same loop guard, corpus and median WER, clear speech apart from the other styles, with
  the unguarded greedy figures (`*_greedy`) beside them for honesty. The WER-vs-steps curve stays
  greedy (cheap; it tracks training, not the final figure).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from omni import metrics
from omni.common import derangement, file_lock
from omni.data.features import FeatureCache, build_features
from omni.hf_lm import check_load_in
from omni.lm import LoraSpec, add_lora, is_hub_id, load_lm, save_lm, save_lora
from omni.params import require, require_choice, require_device, require_layer
from omni.align_losses import ctc_embedding_loss, ctc_readout, distill_loss
from omni.speech_lm import Hypothesis, LoopGuard, SpeechLM, SpeechLMConfig, collate_states
from omni.track import NullTracker, Tracker
from omni.yardstick import clear_rows, content_scores, score_table, whisper_hyps
from omni.train import History, TrainConfig, init_ddp, pick_device, train


@dataclass
class AlignConfig:
    corpus: str = "data/synth"  # synthesized corpus folder (built if missing)
    sentences: int = 3000  # corpus size when it has to be built
    features: str = "cache/features"  # feature cache root
    encoder: str = "tiny.en"  # Whisper source
    encoder_mode: str = "var"  # var | pad30
    lm: str = "runs/lm"  # omni LM folder (omni.pretrain; pretrained with defaults if missing) | nanochat checkpoint folder | HF model folder or hub id
    load_in: str = ""  # "" | 8bit | 4bit: k-bit weights for a Hugging Face LM (bitsandbytes, CUDA only)
    layer: str = "last"  # last | middle | <index> | weighted | weighted_ln
    k: int = 4  # frames per audio token
    projector: str = "stack"  # stack | conv | avg
    prompt: str = ""  # e.g. "Transcribe:"
    prompt_position: str = "after"  # before | after the audio
    trainable: str = "projector"  # projector (frozen LM: the research setting) | projector+lora (peft adapters) | projector+lm (diagnostic: is the frozen LM the limit?)
    lora_rank: int = 16  # LoRA rank r (trainable=projector+lora)
    lora_alpha: float = 32.0  # LoRA scale alpha / r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = ""  # comma-separated module names; "" = attention + MLP projections of the backbone
    lora_grad_clip: float = 0.0  # > 0: LoRA gradients clipped to this norm on their own (0 = with the rest)
    max_bad_steps: int = 10  # stop with an error after this many non-finite steps in a row (0 = never)
    early_lr_factor: float = 1.0  # lr multiplier for the first early_steps steps
    early_steps: int = 0  # steps at early_lr_factor * lr (on top of the warmup)
    freeze_projector_steps: int = 0  # the projector stays still for this many steps (the layer mix, LoRA or LM adapt first)
    steps: int = 1000  # optimiser steps
    batch_size: int = 32  # clips per step
    lr: float = 2e-3  # AdamW peak learning rate
    warmup: int = 50  # linear warm-up steps
    eval_every: int = 250  # steps between held-out evaluations (the WER-vs-steps curve)
    eval_clips: int = 100  # held-out clips decoded at each intermediate evaluation
    max_new_tokens: int = 80  # decoding budget per clip, in LM tokens
    seed: int = 0  # fixes the projector's init, the batch order and the control's shuffle
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs float32
    whisper_baseline: bool = True  # also decode the held-out clips with Whisper's own decoder
    kl_weight: float = 0.0  # lever (issue 10): + this x KL from the same frozen LM reading the transcript where the audio stands (distill_loss); 0 means off
    ctc_weight: float = 0.0  # lever (issue 10): + this x CTC of the audio tokens read as LM tokens (ctc_embedding_loss); 0 means plain cross-entropy
    guard: bool = True  # final held-out decodes (ours, control, Whisper) under the loop guard (LoopGuard); greedy figures kept as *_greedy
    guard_logprob: float = -1.0  # our decoder's guard: re-decode below this mean token log-prob (Whisper keeps openai-whisper's -1); a small LM is rarely that sure, see fallback_fraction and median_logprob
    out: str = ""  # checkpoint folder (audio path weights, resume state); "" = none

    MIN_STEPS: ClassVar[int] = 1  # a subclass may allow 0 (no training)

    def __post_init__(self) -> None:
        """Types and ranges, refused in one line naming the parameter before any corpus, cache or LM
        is touched (`omni run` builds the config before a kernel starts)."""
        require(self.steps >= self.MIN_STEPS, "steps", self.steps, f">= {self.MIN_STEPS}")
        for name in ("sentences", "k", "batch_size", "eval_clips", "max_new_tokens"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("warmup", "eval_every", "early_steps", "freeze_projector_steps", "max_bad_steps"):
            require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        require(self.lr > 0, "lr", self.lr, "> 0")
        require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")
        require(self.early_lr_factor > 0, "early_lr_factor", self.early_lr_factor, "> 0")
        require_choice("encoder_mode", self.encoder_mode, ("var", "pad30"))
        require_choice("dtype", self.dtype, ("bfloat16", "float16", "float32"))
        require_layer(self.layer, self.encoder)
        require_device(self.device)
        check_config(self)


@dataclass
class AlignResult:
    config: AlignConfig
    history: History
    model: SpeechLM
    test: dict  # {"refs", "hyps", "rows", "control_hyps", "whisper_hyps", "greedy_hyps", "whisper_greedy_hyps", "table", "clear_variants"}
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
            build_corpus(SynthConfig(out=str(corpus), sentences=cfg.sentences, seed=0))
        return FeatureCache.open(build_features(corpus / "manifest.jsonl", cfg.features, cfg.encoder, mode=cfg.encoder_mode, progress=progress))


def ensure_lm(cfg: AlignConfig, device: torch.device):
    """(lm, tokenizer) from `cfg.lm` (omni.lm.load_lm); a missing omni LM folder is pretrained first."""
    path = Path(cfg.lm)
    if not path.exists() and not is_hub_id(cfg.lm):
        from omni.pretrain import PretrainConfig, pretrain

        print(f"no LM at {cfg.lm}: pretraining one with the defaults of omni.pretrain")
        pretrain(PretrainConfig(out=cfg.lm, device=str(device)))
    return load_lm(cfg.lm, device, load_in=cfg.load_in)


def lora_spec(cfg: AlignConfig) -> LoraSpec:
    return LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)


def decode(model: SpeechLM, cache: FeatureCache, rows: list[int], states: list[torch.Tensor], batch_size: int, max_new_tokens: int,
           shuffle_seed: int | None = None, guard: LoopGuard | None = None) -> list[Hypothesis]:
    """Hypotheses for `rows`, in order: greedy, or under `guard` (SpeechLM.hypotheses).
    shuffle_seed: give each clip another clip's audio (a seeded derangement: with two or more
    clips, no clip keeps its own)."""
    device = model.gpt_device
    order = list(range(len(rows))) if shuffle_seed is None else derangement(len(rows), shuffle_seed)
    hyps = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = order[i : i + batch_size]
        hidden, lengths = collate_states([states[j].float() for j in chunk])
        hyps += model.hypotheses(hidden.to(device), lengths.to(device), max_new_tokens=max_new_tokens, guard=guard)
    return hyps


def hyp_texts(hyps: list[Hypothesis]) -> list[str]:
    return [h.text for h in hyps]


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


TRAINABLE = ("projector", "projector+lora", "projector+lm")


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
    check_load_in(cfg.load_in)  # k-bit without CUDA: refused before a corpus, a cache or an LM is touched
    if cfg.load_in and cfg.trainable == "projector+lm":
        raise ValueError(f"trainable=projector+lm cannot train k-bit weights (load_in={cfg.load_in!r}): use projector+lora (parameter `trainable`)")
    if cfg.trainable == "projector+lora" and cfg.lora_rank < 1:
        raise ValueError(f"lora_rank={cfg.lora_rank} must be >= 1 (parameter `lora_rank`)")
    Projector(ProjectorConfig(d_in=1, d_out=1, k=cfg.k, kind=cfg.projector))  # raises naming `projector` or `k`
    LayerSelect(cfg.layer, n_states if n_states is not None else 1 << 16)  # raises naming `layer`


def run_alignment(cfg: AlignConfig, tracker: Tracker | NullTracker | None = None, cache: FeatureCache | None = None) -> AlignResult:
    tracker = tracker or NullTracker()
    check_config(cfg)
    # under torchrun: every rank draws the same global batch and trains on its share of it (DDP)
    rank, world, device_name = init_ddp(cfg.device)
    device = pick_device(device_name)
    if rank != 0:
        tracker = NullTracker()  # rank 0 logs and saves
    cache = cache or prepare_cache(cfg)
    check_config(cfg, cache.n_states)
    gpt, tok = ensure_lm(cfg, device)
    train_lm = cfg.trainable == "projector+lm"
    for p in gpt.parameters():
        p.requires_grad_(train_lm)  # frozen LM (default): only the audio path trains
    torch.manual_seed(cfg.seed)
    lm_params = dict(gpt.named_parameters()) if train_lm else {}
    if cfg.trainable == "projector+lora":
        lm_params = add_lora(gpt, lora_spec(cfg))  # seeded: the adapters' init is part of the run
    # the audio path is built on the CPU in fp32 and moved, so a k-bit LM is never moved or cast
    model = SpeechLM(gpt, tok, cache.n_states, cache.d_model, SpeechLMConfig(cfg.layer, cfg.k, cfg.projector, cfg.prompt, cfg.prompt_position))
    model.select.to(device)
    model.projector.to(device)
    model.gpt.train(bool(lm_params))

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

    per_epoch = -(-len(train_rows) // cfg.batch_size)  # batches in one epoch
    at = {"epoch": -1, "i": 0, "it": None}  # where the epoch iterator stands

    def batch_at(step: int):
        """The batch of `step`: epoch step // per_epoch, shuffled by (seed, epoch). A function of the step
        alone, so a run resumed at any step draws what the uninterrupted run drew."""
        epoch, i = divmod(step, per_epoch)
        if (at["epoch"], at["i"]) != (epoch, i):  # a fresh start, a new epoch or a resume: (re)position
            at.update(epoch=epoch, i=0, it=cache.batches(train_rows, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + epoch, states=train_states))
            for _ in range(i):
                next(at["it"])
            at["i"] = i
        at["i"] += 1
        return next(at["it"])

    def objective(hidden: torch.Tensor, lengths: torch.Tensor, texts: list[str]) -> torch.Tensor:
        loss = model(hidden.to(device), lengths.to(device), texts)
        if cfg.ctc_weight:  # the levers, off by default
            loss = loss + cfg.ctc_weight * ctc_embedding_loss(model, hidden.to(device), lengths.to(device), texts)
        if cfg.kl_weight:
            loss = loss + cfg.kl_weight * distill_loss(model, hidden.to(device), lengths.to(device), texts)
        return loss

    def loss_fn(step: int):
        hidden, lengths, rows = batch_at(step)
        texts = [r["text"] for r in rows]
        counts = [len(tok.encode(t)) + 1 for t in texts]  # supervised targets: text + end of text
        if world == 1:
            return objective(hidden, lengths, texts), sum(counts)
        # rank r takes rows r, r + world, ...; weighting its mean loss by its share of the batch's tokens
        # (times world: the loop averages gradients over ranks) gives the one-process batch's gradient
        mine = list(range(rank, len(texts), world))
        n_mine = sum(counts[i] for i in mine)
        loss = objective(hidden[mine], lengths[mine], [texts[i] for i in mine])
        return loss * (n_mine * world / sum(counts)), n_mine

    weights_history: list[list[float]] = []
    wer_curve: list[tuple[int, float]] = []

    def eval_fn(step: int) -> dict[str, float]:
        rows = [test_rows[i] for i in eval_idx]
        hyps = hyp_texts(decode(model, cache, rows, [test_states[i] for i in eval_idx], cfg.batch_size, cfg.max_new_tokens))
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
    params |= {f"gpt.{n}": p for n, p in lm_params.items()}
    tcfg = TrainConfig(
        steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, dtype=cfg.dtype, eval_every=cfg.eval_every,
        ckpt_every=cfg.eval_every if cfg.out and rank == 0 else 0, ckpt_dir=str(Path(cfg.out) / "resume") if cfg.out else "",
        lora_grad_clip=cfg.lora_grad_clip, max_bad_steps=cfg.max_bad_steps, early_lr_factor=cfg.early_lr_factor,
        early_steps=cfg.early_steps, freeze_steps=cfg.freeze_projector_steps, freeze_prefix="projector.",
    )
    hist = train(params, loss_fn, tcfg, tracker, eval_fn=eval_fn)

    # final: the whole held-out split, the shuffled-audio control, Whisper's own decoder, all under one guard
    guard = LoopGuard(seed=cfg.seed, logprob_threshold=cfg.guard_logprob) if cfg.guard else None
    whisper_guard = LoopGuard(seed=cfg.seed) if cfg.guard else None  # Whisper's own calibration
    refs = [cache.rows[r]["text"] for r in test_rows]
    test_meta = [cache.rows[r] for r in test_rows]
    test_labels = [m["labels"] for m in test_meta]
    t1 = time.perf_counter()
    decoded = decode(model, cache, test_rows, test_states, cfg.batch_size, cfg.max_new_tokens, guard=guard)
    decode_seconds = time.perf_counter() - t1
    control = hyp_texts(decode(model, cache, test_rows, test_states, cfg.batch_size, cfg.max_new_tokens, shuffle_seed=cfg.seed + 7, guard=guard))
    systems = {"": hyp_texts(decoded), "control": control}
    if guard is not None:
        systems["greedy"] = [h.greedy for h in decoded]
    if cfg.ctc_weight:  # what the audio tokens spell by themselves (the CTC head), no LM
        systems["ctc"] = ctc_readout(model, test_states, cfg.batch_size)
    if cfg.whisper_baseline:
        systems["whisper"] = whisper_hyps(cache, test_rows, cfg.encoder, whisper_guard)
        if guard is not None:
            systems["whisper_greedy"] = whisper_hyps(cache, test_rows, cfg.encoder, None)
    scores = {
        "test_loss": held_out_loss(model, cache, test_rows, test_states, cfg.batch_size),
        **content_scores(refs, systems, test_labels),
        "fallback_fraction": sum(h.attempts > 1 for h in decoded) / len(decoded),
        "median_logprob": float(torch.tensor([h.avg_logprob for h in decoded]).median()),
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
    named = {"aligned" if k == "" else k: v for k, v in systems.items()}
    test = {"refs": refs, "hyps": systems[""], "control_hyps": control, "rows": test_meta,
            "table": score_table(refs, named, test_labels), "clear_variants": sorted({str(test_labels[i].get("variant")) for i in clear_rows(test_labels)})}
    if guard is not None:
        test["greedy_hyps"] = systems["greedy"]
    if cfg.whisper_baseline:
        test["whisper_hyps"] = systems["whisper"]
        if guard is not None:
            test["whisper_greedy_hyps"] = systems["whisper_greedy"]
    if seen_rows:
        seen_states = cache.load_states(seen_rows)
        seen_hyps = hyp_texts(decode(model, cache, seen_rows, seen_states, cfg.batch_size, cfg.max_new_tokens, guard=guard))
        scores["wer_seen_voice"] = metrics.wer([cache.rows[r]["text"] for r in seen_rows], seen_hyps)
    tracker.log_metrics(scores, step=cfg.steps)
    if rank != 0:
        return AlignResult(cfg, hist, model, test, scores, weights_history, wer_curve)
    tracker.flush()  # the tracker buffers: unflushed, the final scores never reach MLflow
    if cfg.out:
        model.save_audio_path(cfg.out)
        meta = json.loads((Path(cfg.out) / "audio_path.json").read_text())
        lm_dir = Path(cfg.lm)
        if train_lm:  # the LM changed too: the run carries its own copy, so `omni transcribe` uses it
            lm_dir = save_lm(model.gpt, tok, Path(cfg.out) / "lm")
        if cfg.trainable == "projector+lora":  # adapters only, beside the audio path; the base LM is cfg.lm
            save_lora(model.gpt, lora_spec(cfg), cfg.out)
        lm_ref = str(lm_dir.resolve()) if lm_dir.exists() else cfg.lm  # a hub id stays a hub id
        meta |= {"lm": lm_ref, "load_in": cfg.load_in, "encoder": cfg.encoder, "encoder_mode": cfg.encoder_mode, "align": asdict(cfg)}
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
def transcribe_waves(model: SpeechLM, encoder, waves: list[torch.Tensor], mode: str = "var", batch_size: int = 16, max_new_tokens: int = 120,
                     guard: LoopGuard | None = None) -> list[str]:
    """Audio in, text out: encoder -> layer choice -> projector -> greedy decoding (under `guard` if given)."""
    out = []
    device = model.gpt_device
    for i in range(0, len(waves), batch_size):
        states = encoder.encode([w.to(device) for w in waves[i : i + batch_size]], mode=mode, batch_size=batch_size)
        hidden, lengths = collate_states(states)
        out += model.transcribe(hidden.to(device), lengths.to(device), max_new_tokens=max_new_tokens, guard=guard)
    return out
