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
- One text normalisation (omni.eval.metrics.normalize_text) for every system compared.
- The control decodes the held-out clips with their audio shuffled between clips: if the
  transcripts came from the LM's prior rather than the audio, the control's WER would be as good.
- The final held-out decode of every system (ours, the control, Whisper) is scored by omni.eval.yardstick:
  under the same loop guard, corpus and median WER, clear speech apart from the other styles, with
  the unguarded greedy figures (`*_greedy`) beside them for honesty. The WER-vs-steps curve stays
  greedy (cheap; it tracks training, not the final figure).
- `run` is a short sequence of named steps: build the model, load the splits, train (the batch of a
  step is a function of the step: StepBatches), evaluate (HeldOut: every system's transcripts; the
  scores: what MLflow gets), save.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from omni.common import derangement, file_lock
from omni.data.features import FeatureCache, build_features
from omni.data.synth import SynthConfig, build_corpus
from omni.eval import metrics
from omni.eval.yardstick import clear_rows, content_scores, score_table, whisper_hyps
from omni.experiments import pretrain_lm
from omni.experiments.pretrain_lm import PretrainConfig
from omni.model.encoder import MODES, LayerSelect, collate_states, require_layer
from omni.model.hf_lm import check_load_in
from omni.model.lm import LoraSpec, is_hub_id, load_lm, save_lm, save_lora
from omni.model.losses import ctc_embedding_loss, ctc_readout, distill_loss
from omni.model.projector import Projector, ProjectorConfig
from omni.model.speech_lm import PROMPT_POSITIONS, TRAINABLE, Hypothesis, LoopGuard, SpeechLM, SpeechLMConfig, lm_parameters
from omni.params import require, require_choice, require_device
from omni.track import NullTracker, Tracker
from omni.train import DTYPES, History, TrainConfig, init_ddp, pick_device, train


@dataclass
class AlignConfig:
    corpus: str = "data/synth"  # synthesized corpus folder (built if missing)
    sentences: int = 3000  # corpus size when it has to be built
    features: str = "cache/features"  # feature cache root
    encoder: str = "tiny.en"  # Whisper source
    encoder_mode: str = "var"  # var | pad30
    lm: str = "models/lm"  # the LM: an omni LM folder (models/lm: the committed copying LM; a missing folder is pretrained with omni.experiments.pretrain_lm's defaults) | a nanochat checkpoint folder | an HF model folder or hub id
    load_in: str = ""  # "" | 8bit | 4bit: k-bit weights for a Hugging Face LM (bitsandbytes, CUDA only)
    layer: str = "last"  # last | middle | <index> | weighted | weighted_ln
    k: int = 4  # frames per audio token
    projector: str = "stack"  # stack | conv | avg | lego (posteriors over the LM vocabulary mixing its token embeddings, LegoSLM)
    prompt: str = ""  # e.g. "Transcribe:"
    prompt_position: str = "after"  # before | after the audio
    collapse: bool = False  # one audio token per CTC segment of the projector's tokens read as LM tokens (blanks dropped): the text-like layout a frozen LM copies from; needs ctc_weight > 0 to mean anything
    audio_bos: bool = False  # BOS's embedding before the audio tokens, as every pretraining document starts
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
    guard_logprob: float = 0.0  # our decoder's guard: re-decode below this mean token log-prob; 0 takes minus the LM's own validation nats per token (pretrain.json's first_nats: a transcript the LM is less sure of than of prose it reads unaided has failed), or the compression ratio alone where the LM has no such figure. Whisper keeps openai-whisper's -1
    out: str = ""  # folder the trained audio path is saved in (resume checkpoints under out/resume); "" = not saved

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
        require_choice("encoder_mode", self.encoder_mode, MODES)
        require_choice("dtype", self.dtype, DTYPES)
        require_layer(self.layer, self.encoder)
        require_device(self.device)
        check_config(self)


@dataclass
class HeldOut:
    """The final decode of the held-out split ("test"), one entry per clip in cache order: what the
    report shows beside the scores. A system that did not run is None."""

    refs: list[str]  # reference transcripts
    hyps: list[str]  # ours (under the loop guard when `guard`)
    control_hyps: list[str]  # ours, each clip given another clip's audio
    rows: list[dict]  # the clips' cache rows (text, labels: voice, style, rate, ...)
    table: list[dict]  # WER by label group for every system (omni.eval.yardstick.score_table)
    clear_variants: list[str]  # the voice variants counted as clear speech
    greedy_hyps: list[str] | None = None  # ours without the guard (when `guard`)
    whisper_hyps: list[str] | None = None  # Whisper's own decoder (when `whisper_baseline`)
    whisper_greedy_hyps: list[str] | None = None  # ... without the guard (when both)


@dataclass
class AlignResult:
    config: AlignConfig
    history: History
    model: SpeechLM
    test: HeldOut
    scores: dict[str, float]  # every final metric, as logged to MLflow
    layer_weights_history: list[list[float]] = field(default_factory=list)  # the layer mix at each evaluation
    wer_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, greedy WER on eval_clips) at each evaluation

    def metrics(self) -> dict[str, float]:
        return dict(self.scores)


def prepare_cache(cfg: AlignConfig, progress: bool = True) -> FeatureCache:
    """The synthesized corpus and its feature cache, built on first use (both idempotent; an existing
    corpus is used as it is). Safe from parallel grid workers: the first holds a lock while it
    builds, the others wait and then find everything in place."""
    corpus = Path(cfg.corpus)
    with file_lock(corpus.parent / f".{corpus.name}.prepare.lock"):
        if not (corpus / "manifest.jsonl").exists():
            build_corpus(SynthConfig(out=str(corpus), sentences=cfg.sentences, seed=0))
        return FeatureCache.open(build_features(corpus / "manifest.jsonl", cfg.features, cfg.encoder, mode=cfg.encoder_mode, progress=progress))


def ensure_lm(cfg: AlignConfig, device: torch.device):
    """(lm, tokenizer) from `cfg.lm` (omni.model.lm.load_lm); a missing omni LM folder is pretrained first."""
    path = Path(cfg.lm)
    if not path.exists() and not is_hub_id(cfg.lm):
        print(f"no LM at {cfg.lm}: pretraining one with the defaults of omni.experiments.pretrain_lm")
        pretrain_lm.run(PretrainConfig(out=cfg.lm, device=str(device)))
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


def check_config(cfg: AlignConfig, n_states: int | None = None) -> None:
    """The audio path's parameters, checked before minutes go into a corpus, a cache or an LM.
    Without n_states the layer is checked by name only (its range needs the encoder)."""
    if cfg.trainable not in TRAINABLE:
        raise ValueError(f"trainable {cfg.trainable!r} is not one of {TRAINABLE} (parameter `trainable`)")
    if cfg.prompt_position not in PROMPT_POSITIONS:
        raise ValueError(f"prompt_position {cfg.prompt_position!r} is not one of {PROMPT_POSITIONS} (parameter `prompt_position`)")
    check_load_in(cfg.load_in)  # k-bit without CUDA: refused before a corpus, a cache or an LM is touched
    if cfg.load_in and cfg.trainable == "projector+lm":
        raise ValueError(f"trainable=projector+lm cannot train k-bit weights (load_in={cfg.load_in!r}): use projector+lora (parameter `trainable`)")
    if cfg.trainable == "projector+lora" and cfg.lora_rank < 1:
        raise ValueError(f"lora_rank={cfg.lora_rank} must be >= 1 (parameter `lora_rank`)")
    Projector(ProjectorConfig(d_in=1, d_out=1, k=cfg.k, kind=cfg.projector, vocab=2))  # raises naming `projector` or `k`
    LayerSelect(cfg.layer, n_states if n_states is not None else 1 << 16)  # raises naming `layer`


# --- the steps of `run` -------------------------------------------------------------------------


def build_model(cfg: AlignConfig, cache: FeatureCache, device: torch.device) -> tuple[SpeechLM, dict[str, torch.nn.Parameter]]:
    """(the SpeechLM, the LM parameters that train): the LM from `cfg.lm`, frozen but for what
    `trainable` names; the audio path built on the CPU in fp32 and moved, so a k-bit LM is never
    moved or cast. Seeded: the adapters' and the audio path's init are part of the run."""
    gpt, tok = ensure_lm(cfg, device)
    torch.manual_seed(cfg.seed)
    lm_params = lm_parameters(gpt, cfg.trainable, lora_spec(cfg))
    model = SpeechLM(gpt, tok, cache.n_states, cache.d_model, SpeechLMConfig(cfg.layer, cfg.k, cfg.projector, cfg.prompt, cfg.prompt_position, cfg.collapse, cfg.audio_bos))
    model.select.to(device)
    model.projector.to(device)
    model.gpt.train(bool(lm_params))
    return model, lm_params


@dataclass
class Splits:
    """The cache rows of each split, and the states training and evaluation read, in memory."""

    train: list[int]
    test: list[int]  # held out: new sentences, new voices
    seen: list[int]  # test_seen_voice: new sentences, seen voices
    train_states: list[torch.Tensor]
    test_states: list[torch.Tensor]
    load_seconds: float  # reading train_states and test_states


def load_splits(cache: FeatureCache) -> Splits:
    train_rows, test_rows = cache.select(split="train"), cache.select(split="test")
    seen_rows = cache.select(split="test_seen_voice")
    if not train_rows or not test_rows:
        raise ValueError(f"{cache.path}: the corpus needs `train` and `test` splits (labels.split)")
    t0 = time.perf_counter()
    train_states = cache.load_states(train_rows)
    test_states = cache.load_states(test_rows)
    return Splits(train_rows, test_rows, seen_rows, train_states, test_states, time.perf_counter() - t0)


class StepBatches:
    """The batch of any step: epoch step // per_epoch, its batches shuffled by (seed, epoch). A function
    of the step alone, so a run resumed at any step draws what the uninterrupted run drew."""

    def __init__(self, cache: FeatureCache, rows: list[int], states: list[torch.Tensor], batch_size: int, seed: int):
        self.cache, self.rows, self.states, self.batch_size, self.seed = cache, rows, states, batch_size, seed
        self.per_epoch = -(-len(rows) // batch_size)  # batches in one epoch
        self.epoch, self.i, self.it = -1, 0, None  # where the epoch iterator stands

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        epoch, i = divmod(step, self.per_epoch)
        if (self.epoch, self.i) != (epoch, i):  # a fresh start, a new epoch or a resume: (re)position
            self.epoch, self.i = epoch, 0
            self.it = self.cache.batches(self.rows, self.batch_size, shuffle=True, seed=self.seed * 1000 + epoch, states=self.states)
            for _ in range(i):
                next(self.it)
            self.i = i
        self.i += 1
        return next(self.it)


def objective(model: SpeechLM, cfg: AlignConfig, device: torch.device, hidden: torch.Tensor, lengths: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Cross-entropy on the transcript, plus the levers that are on (off by default)."""
    loss = model(hidden.to(device), lengths.to(device), texts)
    if cfg.ctc_weight:
        loss = loss + cfg.ctc_weight * ctc_embedding_loss(model, hidden.to(device), lengths.to(device), texts)
    if cfg.kl_weight:
        loss = loss + cfg.kl_weight * distill_loss(model, hidden.to(device), lengths.to(device), texts)
    return loss


def step_loss(step: int, model: SpeechLM, cfg: AlignConfig, device: torch.device, batches: StepBatches, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """The training loop's loss_fn: (loss of this rank's share of the step's batch, its target tokens)."""
    hidden, lengths, rows = batches(step)
    texts = [r["text"] for r in rows]
    counts = [len(model.tokenizer.encode(t)) + 1 for t in texts]  # supervised targets: text + end of text
    if world == 1:
        return objective(model, cfg, device, hidden, lengths, texts), sum(counts)
    # rank r takes rows r, r + world, ...; weighting its mean loss by its share of the batch's tokens
    # (times world: the loop averages gradients over ranks) gives the one-process batch's gradient
    mine = list(range(rank, len(texts), world))
    n_mine = sum(counts[i] for i in mine)
    loss = objective(model, cfg, device, hidden[mine], lengths[mine], [texts[i] for i in mine])
    return loss * (n_mine * world / sum(counts)), n_mine


@dataclass
class Curves:
    """What each intermediate evaluation adds: the WER-vs-steps curve and the layer mix."""

    wer: list[tuple[int, float]] = field(default_factory=list)
    layer_weights: list[list[float]] = field(default_factory=list)


def eval_step(step: int, model: SpeechLM, cfg: AlignConfig, cache: FeatureCache, data: Splits, curves: Curves) -> dict[str, float]:
    """The training loop's eval_fn: greedy WER and loss on the first eval_clips held-out clips."""
    n = min(cfg.eval_clips, len(data.test))
    rows, states = data.test[:n], data.test_states[:n]
    hyps = hyp_texts(decode(model, cache, rows, states, cfg.batch_size, cfg.max_new_tokens))
    refs = [cache.rows[r]["text"] for r in rows]
    loss = held_out_loss(model, cache, rows, states, cfg.batch_size)
    model.projector.train()
    model.select.train()
    w = metrics.wer(refs, hyps)
    curves.wer.append((step + 1, w))
    curves.layer_weights.append(model.select.layer_weights().tolist())
    return {"eval_loss": loss, "eval_wer": w} | {f"layer_weight.{i}": v for i, v in enumerate(curves.layer_weights[-1])}


def train_config(cfg: AlignConfig, rank: int) -> TrainConfig:
    """The loop's settings; rank 0 alone checkpoints (every evaluation, under out/resume)."""
    return TrainConfig(
        steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, dtype=cfg.dtype, eval_every=cfg.eval_every,
        ckpt_every=cfg.eval_every if cfg.out and rank == 0 else 0, ckpt_dir=str(Path(cfg.out) / "resume") if cfg.out else "",
        lora_grad_clip=cfg.lora_grad_clip, max_bad_steps=cfg.max_bad_steps, early_lr_factor=cfg.early_lr_factor,
        early_steps=cfg.early_steps, freeze_projector_steps=cfg.freeze_projector_steps,
    )


def trainable_parameters(model: SpeechLM, lm_params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    params = {f"select.{n}": p for n, p in model.select.named_parameters()}
    params |= {f"projector.{n}": p for n, p in model.projector.named_parameters()}
    return params | {f"gpt.{n}": p for n, p in lm_params.items()}


def guard_floor(cfg: AlignConfig) -> float:
    """Our decoder's log-prob floor: `guard_logprob`, or with 0 minus the LM's validation nats per token
    (its pretrain.json), or -inf (the compression ratio alone) for an LM without one."""
    if cfg.guard_logprob != 0:
        return cfg.guard_logprob
    meta = Path(cfg.lm) / "pretrain.json"
    if meta.exists() and "first_nats" in (m := json.loads(meta.read_text())):
        return -float(m["first_nats"])
    return float("-inf")


def evaluate(cfg: AlignConfig, model: SpeechLM, cache: FeatureCache, data: Splits, hist: History) -> tuple[HeldOut, dict[str, float]]:
    """The final figures: the whole held-out split decoded by ours, the shuffled-audio control and
    Whisper's own decoder, all under one loop guard (greedy beside), what the audio tokens spell alone
    when the CTC lever is on, the held-out loss, costs, and the WER of seen voices on new sentences."""
    floor = guard_floor(cfg)
    guard = LoopGuard(seed=cfg.seed, logprob_threshold=floor) if cfg.guard else None
    whisper_guard = LoopGuard(seed=cfg.seed) if cfg.guard else None  # Whisper's own calibration
    rows, states = data.test, data.test_states
    refs = [cache.rows[r]["text"] for r in rows]
    meta = [cache.rows[r] for r in rows]
    labels = [m["labels"] for m in meta]
    t0 = time.perf_counter()
    decoded = decode(model, cache, rows, states, cfg.batch_size, cfg.max_new_tokens, guard=guard)
    decode_seconds = time.perf_counter() - t0
    control = hyp_texts(decode(model, cache, rows, states, cfg.batch_size, cfg.max_new_tokens, shuffle_seed=cfg.seed + 7, guard=guard))
    systems = {"": hyp_texts(decoded), "control": control}
    if guard is not None:
        systems["greedy"] = [h.greedy for h in decoded]
    # what the audio tokens spell by themselves, no LM: the LM-independent content measure (meaningful
    # when the tokens were pulled onto word embeddings: ctc_weight > 0 or a lego projector)
    systems["ctc"] = ctc_readout(model, states, cfg.batch_size)
    if cfg.whisper_baseline:
        systems["whisper"] = whisper_hyps(cache, rows, cfg.encoder, whisper_guard)
        if guard is not None:
            systems["whisper_greedy"] = whisper_hyps(cache, rows, cfg.encoder, None)
    scores = {
        "test_loss": held_out_loss(model, cache, rows, states, cfg.batch_size),
        **content_scores(refs, systems, labels),
        "fallback_fraction": sum(h.attempts > 1 for h in decoded) / len(decoded),
        **({"guard_floor": floor} if math.isfinite(floor) else {}),  # no floor: the compression ratio alone
        "median_logprob": float(torch.tensor([h.avg_logprob for h in decoded]).median()),
        "train_seconds": hist.seconds,
        "load_seconds": data.load_seconds,
        "decode_seconds_per_clip": decode_seconds / len(rows),
        "tokens_per_s": sum(hist.tokens_per_s[1:]) / max(1, len(hist.tokens_per_s) - 1),
        "step_seconds": hist.seconds / max(1, len(hist.loss)),
        "skipped_steps": hist.skipped,
        "n_train": len(data.train),
        "n_test": len(rows),
    }
    best = min(hist.evals, key=lambda e: e["eval_loss"]) if hist.evals else None
    if best:
        scores["best_eval_step"] = best["step"] + 1
        scores["seconds_to_best"] = hist.seconds * (best["step"] + 1) / max(1, cfg.steps)
    named = {"aligned" if k == "" else k: v for k, v in systems.items()}
    test = HeldOut(refs=refs, hyps=systems[""], control_hyps=control, rows=meta, table=score_table(refs, named, labels),
                   clear_variants=sorted({str(labels[i].get("variant")) for i in clear_rows(labels)}),
                   greedy_hyps=systems.get("greedy"), whisper_hyps=systems.get("whisper"), whisper_greedy_hyps=systems.get("whisper_greedy"))
    if data.seen:
        seen_hyps = hyp_texts(decode(model, cache, data.seen, cache.load_states(data.seen), cfg.batch_size, cfg.max_new_tokens, guard=guard))
        scores["wer_seen_voice"] = metrics.wer([cache.rows[r]["text"] for r in data.seen], seen_hyps)
    return test, scores


def headline(res: AlignResult) -> list[dict]:
    """The report's first table: on the clear held-out speech (unseen voices and sentences), our WER,
    the shuffled-audio control's and Whisper's own decoder's on the same clips (each a row: system,
    WER, median per-clip WER, and the WER on every held-out clip), then what the audio adds: the
    control's WER minus ours. Whisper's row says so when it was skipped."""
    s, enc = res.scores, res.config.encoder
    rows = [("ours: frozen LM, projector only", ""), ("control: ours with shuffled audio", "control_")]
    out = [{"system": name, "WER": s[f"clear_{p}wer"], "median WER": s[f"clear_{p}median_wer"], "WER, all styles": s[f"{p}wer"]}
           for name, p in rows]
    if "clear_whisper_wer" in s:
        out.append({"system": f"Whisper {enc}'s own decoder", "WER": s["clear_whisper_wer"], "median WER": s["clear_whisper_median_wer"],
                    "WER, all styles": s["whisper_wer"]})
    else:
        out.append({"system": f"Whisper {enc}'s own decoder: not run (whisper_baseline=false)", "WER": float("nan"),
                    "median WER": float("nan"), "WER, all styles": float("nan")})
    out.append({"system": "what the audio adds (control minus ours)", "WER": s["clear_control_wer"] - s["clear_wer"],
                "median WER": s["clear_control_median_wer"] - s["clear_median_wer"], "WER, all styles": s["control_wer"] - s["wer"]})
    return out


def save(res: AlignResult, tracker: Tracker | NullTracker) -> None:
    """The trained audio path in cfg.out (plus the LoRA adapters, or a copy of the LM when it trained),
    and in audio_path.json what omni.experiments.trained needs to load it: the LM, the encoder and the config."""
    cfg, model = res.config, res.model
    model.save_audio_path(cfg.out)
    meta = json.loads((Path(cfg.out) / "audio_path.json").read_text())
    lm_dir = Path(cfg.lm)
    if cfg.trainable == "projector+lm":  # the LM changed too: the run carries its own copy, so `omni transcribe` uses it
        lm_dir = save_lm(model.gpt, model.tokenizer, Path(cfg.out) / "lm")
    if cfg.trainable == "projector+lora":  # adapters only, beside the audio path; the base LM is cfg.lm
        save_lora(model.gpt, lora_spec(cfg), cfg.out)
    lm_ref = str(lm_dir.resolve()) if lm_dir.exists() else cfg.lm  # a hub id stays a hub id
    meta |= {"lm": lm_ref, "load_in": cfg.load_in, "encoder": cfg.encoder, "encoder_mode": cfg.encoder_mode, "align": asdict(cfg)}
    (Path(cfg.out) / "audio_path.json").write_text(json.dumps(meta, indent=2))
    tracker.log_artifact(cfg.out, artifact_path="model")


def run(cfg: AlignConfig, tracker: Tracker | NullTracker | None = None, cache: FeatureCache | None = None) -> AlignResult:
    """Notebook 03's one call: train the audio path on the cache's train split, score the held-out
    split, save to cfg.out. Under torchrun every rank draws the same global batch and trains on its
    share of it (DDP); rank 0 logs and saves."""
    tracker = tracker or NullTracker()
    check_config(cfg)
    rank, world, device_name = init_ddp(cfg.device)
    device = pick_device(device_name)
    if rank != 0:
        tracker = NullTracker()
    cache = cache or prepare_cache(cfg)
    check_config(cfg, cache.n_states)
    model, lm_params = build_model(cfg, cache, device)
    data = load_splits(cache)
    batches = StepBatches(cache, data.train, data.train_states, cfg.batch_size, cfg.seed)
    curves = Curves()
    hist = train(trainable_parameters(model, lm_params), partial(step_loss, model=model, cfg=cfg, device=device, batches=batches, rank=rank, world=world),
                 train_config(cfg, rank), tracker, eval_fn=partial(eval_step, model=model, cfg=cfg, cache=cache, data=data, curves=curves))
    test, scores = evaluate(cfg, model, cache, data, hist)
    tracker.log_metrics(scores, step=cfg.steps)
    res = AlignResult(cfg, hist, model, test, scores, curves.layer_weights, curves.wer)
    if rank == 0:
        tracker.flush()  # the tracker buffers: unflushed, the final scores never reach MLflow
        if cfg.out:
            save(res, tracker)
    return res
