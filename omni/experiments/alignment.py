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
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from omni.common import derangement
from omni.data.features import FeatureCache, build_features
from omni.data.synth import SynthConfig, prepare_corpus
from omni.eval import metrics
from omni.eval.yardstick import clear_rows, content_scores, score_table, whisper_hyps
from omni.experiments.audio_run import AudioRunConfig, Built, build_model, check_layer, run_meta, save_run, trainable_parameters
from omni.model.encoder import collate_states, mask_frames
from omni.model.losses import ctc_embedding_loss, ctc_readout, distill_loss
from omni.model.speech_lm import DECODES, PROMPT_POSITIONS, Decoding, Hypothesis, LoopGuard, SpeechLM
from omni.params import ParamError, require, require_choice
from omni.track import NullTracker, Tracker
from omni.train import History, TrainConfig, init_ddp, pick_device, train


@dataclass
class AlignConfig(AudioRunConfig):
    sentences: int = 3000  # corpus size when it has to be built
    clips_per_sentence: int = 1  # train/val renditions of each sentence by distinct seen voices when the corpus is built (the held-out clips are the same for any value)
    prompt: str = ""  # e.g. "Transcribe:"
    prompt_position: str = "after"  # before | after the audio
    collapse: bool = False  # one audio token per CTC segment of the projector's tokens read as LM tokens (blanks dropped): the text-like layout a frozen LM copies from; needs ctc_weight > 0 to mean anything
    audio_bos: bool = False  # BOS's embedding before the audio tokens, as every pretraining document starts
    time_mask: float = 0.0  # share of each training clip's Whisper frames hidden (zeroed) in spans of `mask_span` frames (SpecAugment's time masking); 0 = off
    mask_span: int = 10  # frames per hidden span (time_mask)
    ctc_weight: float = 0.0  # + this x CTC of the audio tokens read as LM tokens (ctc_embedding_loss): a CTC head over the LM vocabulary, which joint decoding reads; 0 means plain cross-entropy
    kl_weight: float = 0.0  # + this x KL from the same LM reading the transcript where the audio stands (distill_loss); 0 means off
    decode: str = "greedy"  # how ours is decoded in the final evaluation and by default afterwards: greedy (the LM alone, under the loop guard) | joint (CTC/LM beam search; needs a CTC head). A run with a CTC head is scored both ways
    beam: int = 8  # joint decoding: hypotheses kept per clip
    ctc_decode_weight: float = -1.0  # joint decoding: weight of the CTC prefix log-probability (the LM's: 1 minus it); -1 = the started run's own (`run`), else 0.3
    ctc_decode_weights: str = ""  # e.g. "0.3,0.5,0.7,0.9": joint decoding's CTC weight chosen on the val split (sentences and clips never in training nor test), the best used on the held-out clips and saved with the run; "" = ctc_decode_weight as given
    tune_clips: int = 100  # val clips the CTC weight is chosen on (ctc_decode_weights)
    eval_clips: int = 100  # held-out clips decoded at each intermediate evaluation
    max_new_tokens: int = 80  # decoding budget per clip, in LM tokens
    clear_only: bool = False  # decode only the clear held-out clips (style normal: the trainable-axis table's) and not the seen-voice sentences: the tour's budget; whispered and other styles then go unscored
    whisper_baseline: bool = True  # also decode the held-out clips with Whisper's own decoder (shipped transcripts are used where the clips match)
    guard: bool = True  # greedy decodes (ours, control, Whisper) under the loop guard (LoopGuard); the unguarded figures kept as *unguarded*
    guard_logprob: float = 0.0  # our decoder's guard: re-decode below this mean token log-prob; 0 takes minus the LM's own validation nats per token (pretrain.json's first_nats: a transcript the LM is less sure of than of prose it reads unaided has failed), or the compression ratio alone where the LM has no such figure. Whisper keeps openai-whisper's -1

    MIN_STEPS: ClassVar[int] = 0  # 0: no training, the started run (`run`) evaluated as it is

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps == 0 and not self.run:
            raise ParamError("parameter `steps` = 0: evaluates a trained run as it is, so it needs `run` (e.g. -p run=models/hear)")
        for name in ("sentences", "clips_per_sentence", "eval_clips", "max_new_tokens", "beam", "mask_span"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        require_choice("prompt_position", self.prompt_position, PROMPT_POSITIONS)
        require_choice("decode", self.decode, DECODES)
        require(0 <= self.ctc_decode_weight <= 1 or self.ctc_decode_weight == -1, "ctc_decode_weight", self.ctc_decode_weight,
                "in [0, 1], or -1 (the started run's own, else 0.3)")
        require(self.ctc_weight >= 0, "ctc_weight", self.ctc_weight, ">= 0")
        require(0 <= self.time_mask < 1, "time_mask", self.time_mask, "in [0, 1)")
        require(self.kl_weight >= 0, "kl_weight", self.kl_weight, ">= 0")
        if self.decode == "joint" and not self.ctc_weight and self.projector != "lego" and not self.run:
            raise ParamError("parameter `decode` = 'joint': needs a CTC head (ctc_weight > 0 or projector=lego) for its CTC term")
        require(self.tune_clips >= 1, "tune_clips", self.tune_clips, ">= 1")
        try:
            weights = self.decode_weights()
        except ValueError:
            raise ParamError(f"parameter `ctc_decode_weights` = {self.ctc_decode_weights!r}: must be comma-separated numbers in [0, 1]") from None
        require(all(0 <= w <= 1 for w in weights), "ctc_decode_weights", self.ctc_decode_weights, "comma-separated numbers in [0, 1]")

    def decode_weights(self) -> list[float]:
        """The CTC weights to choose from on the val split ([] = none: ctc_decode_weight as given)."""
        return [float(w) for w in self.ctc_decode_weights.split(",") if w.strip()]

    def decoding(self, started: dict | None = None) -> Decoding:
        """How ours is decoded; ctc_decode_weight -1 takes the started run's own (its audio_path.json
        `decoding`: an evaluation of a run decodes it as the run does), else Decoding's default."""
        weight = self.ctc_decode_weight
        if weight < 0:
            weight = (started or {}).get("decoding", {}).get("ctc_decode_weight", Decoding.ctc_decode_weight)
        return Decoding(self.decode, self.beam, weight)


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
    systems: dict[str, list[str]] = field(default_factory=dict)  # every system's transcripts by name: greedy, joint, their *_control, unguarded, ctc, whisper, ...


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
    corpus is used as it is). Safe from parallel grid workers (omni.data.synth.prepare_corpus and
    build_features each lock while they build)."""
    if (Path(cfg.features) / "index.json").is_file():  # a cache folder itself
        return FeatureCache.open(cfg.features)
    corpus = prepare_corpus(SynthConfig(out=cfg.corpus, sentences=cfg.sentences, clips_per_sentence=cfg.clips_per_sentence, seed=0))
    # build_features takes a lock of its own: parallel workers encode once
    return FeatureCache.open(build_features(corpus / "manifest.jsonl", cfg.features, cfg.encoder, mode=cfg.encoder_mode, progress=progress))


def decode(model: SpeechLM, cache: FeatureCache, rows: list[int], states: list[torch.Tensor], batch_size: int, max_new_tokens: int,
           shuffle_seed: int | None = None, guard: LoopGuard | None = None, decoding: Decoding | None = None) -> list[Hypothesis]:
    """Hypotheses for `rows`, in order: greedy (under `guard` if given) or as `decoding` says (SpeechLM.hypotheses).
    shuffle_seed: give each clip another clip's audio (a seeded derangement: with two or more
    clips, no clip keeps its own)."""
    device = model.gpt_device
    order = list(range(len(rows))) if shuffle_seed is None else derangement(len(rows), shuffle_seed)
    hyps = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = order[i : i + batch_size]
        hidden, lengths = collate_states([states[j].float() for j in chunk])
        hyps += model.hypotheses(hidden.to(device), lengths.to(device), max_new_tokens, guard, decoding)
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


# --- the steps of `run` -------------------------------------------------------------------------


@dataclass
class Splits:
    """The cache rows of each split, and the states training and evaluation read, in memory."""

    train: list[int]
    test: list[int]  # held out: new sentences, new voices
    seen: list[int]  # test_seen_voice: new sentences, seen voices
    train_states: list[torch.Tensor]
    test_states: list[torch.Tensor]
    load_seconds: float  # reading train_states and test_states
    layers: list[int] | None = None  # the states loaded (None: all)


def load_splits(cache: FeatureCache, layers: list[int] | None = None) -> Splits:
    """The splits' rows and states; `layers`: the states to load (LayerSelect.states_read; None = all):
    a one-state choice holds a fifth of tiny.en's cache in memory, and reads it five times as fast."""
    train_rows, test_rows = cache.select(split="train"), cache.select(split="test")
    seen_rows = cache.select(split="test_seen_voice")
    if not train_rows or not test_rows:
        raise ValueError(f"{cache.path}: the corpus needs `train` and `test` splits (labels.split)")
    t0 = time.perf_counter()
    train_states = cache.load_states(train_rows, layers)
    test_states = cache.load_states(test_rows, layers)
    return Splits(train_rows, test_rows, seen_rows, train_states, test_states, time.perf_counter() - t0, layers)


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
    if cfg.time_mask:  # drawn from (seed, step): a resumed run masks what the uninterrupted one did
        hidden = mask_frames(hidden, lengths, cfg.time_mask, cfg.mask_span, torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
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
        lora_grad_clip=cfg.lora_grad_clip, lm_lr=cfg.lm_lr, max_bad_steps=cfg.max_bad_steps, early_lr_factor=cfg.early_lr_factor,
        early_steps=cfg.early_steps, freeze_projector_steps=cfg.freeze_projector_steps,
    )


def guard_floor(cfg: AlignConfig, lm: str) -> float:
    """Our decoder's log-prob floor: `guard_logprob`, or with 0 minus the LM's validation nats per token
    (its pretrain.json), or -inf (the compression ratio alone) for an LM without one."""
    if cfg.guard_logprob != 0:
        return cfg.guard_logprob
    meta = Path(lm) / "pretrain.json"
    if meta.exists() and "first_nats" in (m := json.loads(meta.read_text())):
        return -float(m["first_nats"])
    return float("-inf")


def has_ctc_head(cfg: AlignConfig, built: Built) -> bool:
    """The audio tokens were trained to spell the LM vocabulary (here, or in the run it started from)."""
    started = bool(built.start and run_meta(built.start)[1].get("ctc_head"))
    return bool(cfg.ctc_weight > 0 or cfg.projector == "lego" or started)


def evaluate(cfg: AlignConfig, built: Built, cache: FeatureCache, data: Splits, hist: History) -> tuple[HeldOut, dict[str, float], Decoding]:
    """The final figures on the whole held-out split: ours decoded greedy (the LM alone, under the loop
    guard; unguarded beside) and, with a CTC head, joint (CTC/LM beam search), each beside its
    shuffled-audio control; what the audio tokens spell alone (CTC readout); Whisper's own decoder;
    the held-out loss, costs, and the WER of seen voices on new sentences. "" and "control" are the
    decoding `decode` names. Also the decoding the run is saved with: `decode`, and joint decoding's
    CTC weight as chosen on the val split (ctc_decode_weights) or given."""
    model = built.model
    floor = guard_floor(cfg, cfg.lm)
    guard = LoopGuard(seed=cfg.seed, logprob_threshold=floor) if cfg.guard else None
    whisper_guard = LoopGuard(seed=cfg.seed) if cfg.guard else None  # Whisper's own calibration
    rows, states = data.test, data.test_states
    if cfg.clear_only:
        keep = clear_rows([cache.rows[r]["labels"] for r in rows])
        rows, states = [rows[i] for i in keep], [states[i] for i in keep]
    refs = [cache.rows[r]["text"] for r in rows]
    meta = [cache.rows[r] for r in rows]
    labels = [m["labels"] for m in meta]
    ctc_head = has_ctc_head(cfg, built)
    started = run_meta(built.start)[1] if built.start else None
    joint = replace(cfg.decoding(started), decode="joint")
    tuned: dict[str, float] = {}
    if ctc_head and cfg.decode_weights():
        joint, tuned = choose_ctc_weight(cfg, model, cache, joint)
    decodings = {"greedy": Decoding("greedy")} | ({"joint": joint} if ctc_head else {})
    systems: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    decoded: dict[str, list[Hypothesis]] = {}
    for name, d in decodings.items():
        t0 = time.perf_counter()
        decoded[name] = decode(model, cache, rows, states, cfg.batch_size, cfg.max_new_tokens, guard=guard, decoding=d)
        seconds[name] = time.perf_counter() - t0
        systems[name] = hyp_texts(decoded[name])
        systems[f"{name}_control"] = hyp_texts(decode(model, cache, rows, states, cfg.batch_size, cfg.max_new_tokens,
                                                      shuffle_seed=cfg.seed + 7, guard=guard, decoding=d))
    systems[""], systems["control"] = systems[cfg.decode], systems[f"{cfg.decode}_control"]
    if guard is not None:
        systems["unguarded"] = [h.greedy for h in decoded["greedy"]]
    # what the audio tokens spell by themselves, no LM: the LM-independent content measure (meaningful
    # when the tokens were pulled onto word embeddings: a CTC head)
    systems["ctc"] = ctc_readout(model, states, cfg.batch_size)
    if cfg.whisper_baseline:
        systems["whisper"] = whisper_hyps(cache, rows, cfg.encoder, whisper_guard)
        if guard is not None:
            systems["whisper_unguarded"] = whisper_hyps(cache, rows, cfg.encoder, None)
    ours = decoded[cfg.decode]
    scores = {
        "test_loss": held_out_loss(model, cache, rows, states, cfg.batch_size),
        **content_scores(refs, systems, labels),
        "fallback_fraction": sum(h.attempts > 1 for h in decoded["greedy"]) / len(rows),
        **({"guard_floor": floor} if math.isfinite(floor) else {}),  # no floor: the compression ratio alone
        "median_logprob": float(torch.tensor([h.avg_logprob for h in ours]).median()),
        "train_seconds": hist.seconds,
        "load_seconds": data.load_seconds,
        "decode_seconds_per_clip": seconds[cfg.decode] / len(rows),
        **{f"{name}_seconds_per_clip": sec / len(rows) for name, sec in seconds.items()},
        "tokens_per_s": sum(hist.tokens_per_s[1:]) / max(1, len(hist.tokens_per_s) - 1),
        "step_seconds": hist.seconds / max(1, len(hist.loss)),
        "skipped_steps": hist.skipped,
        "n_train": len(data.train),
        "n_test": len(rows),
        **({"ctc_decode_weight_chosen": joint.ctc_decode_weight} if ctc_head else {}),
        **tuned,
    }
    best = min(hist.evals, key=lambda e: e["eval_loss"]) if hist.evals else None
    if best:
        scores["best_eval_step"] = best["step"] + 1
        scores["seconds_to_best"] = hist.seconds * (best["step"] + 1) / max(1, cfg.steps)
    # the table names ours and its control once: the decoding `decode` chose is not repeated under its own name
    named = {"ours" if k == "" else k: v for k, v in systems.items() if k not in (cfg.decode, f"{cfg.decode}_control")}
    test = HeldOut(refs=refs, hyps=systems[""], control_hyps=systems["control"], rows=meta, table=score_table(refs, named, labels),
                   clear_variants=sorted({str(labels[i].get("variant")) for i in clear_rows(labels)}), systems=systems)
    if data.seen and not cfg.clear_only:
        seen_hyps = hyp_texts(decode(model, cache, data.seen, cache.load_states(data.seen, data.layers), cfg.batch_size, cfg.max_new_tokens,
                                     guard=guard, decoding=decodings[cfg.decode]))
        scores["wer_seen_voice"] = metrics.wer([cache.rows[r]["text"] for r in data.seen], seen_hyps)
    return test, scores, replace(joint, decode=cfg.decode)


def choose_ctc_weight(cfg: AlignConfig, model: SpeechLM, cache: FeatureCache, joint: Decoding) -> tuple[Decoding, dict[str, float]]:
    """Joint decoding's CTC weight, chosen among cfg.ctc_decode_weights by WER on `tune_clips` clips of the
    val split (sentences that are neither trained on nor tested; seen voices): how much to trust this
    run's LM is a property of the run, not a constant, and the test clips must not choose it. Returns the
    decoding with the best weight and {"val_joint_wer.ctc<w>": WER} for every weight tried."""
    rows = cache.select(split="val")[: cfg.tune_clips]
    if not rows:
        raise ValueError(f"{cache.path}: no val split to choose ctc_decode_weight on (parameter `ctc_decode_weights`)")
    states = cache.load_states(rows, model.states_read())
    refs = [cache.rows[r]["text"] for r in rows]
    wers = {}
    for w in cfg.decode_weights():
        hyps = hyp_texts(decode(model, cache, rows, states, cfg.batch_size, cfg.max_new_tokens, decoding=replace(joint, ctc_decode_weight=w)))
        wers[w] = metrics.wer(refs, hyps)
    best = min(wers, key=lambda w: (wers[w], w))
    return replace(joint, ctc_decode_weight=best), {f"val_joint_wer.ctc{w:g}": v for w, v in wers.items()}


SYSTEM_NAMES = {  # the systems of a held-out evaluation as a report names them
    "greedy": "ours, greedy (the LM alone, loop guard)", "greedy_control": "ours, greedy, shuffled audio",
    "joint": "ours, joint CTC/LM beam search", "joint_control": "ours, joint, shuffled audio",
    "ctc": "the audio tokens alone (CTC readout, no LM)", "whisper": "Whisper's own decoder (loop guard)",
}


def headline(res: AlignResult) -> list[dict]:
    """The report's first table, on the clear held-out speech (unseen voices and sentences): every
    decoding of ours beside its shuffled-audio control, the CTC readout, Whisper's own decoder on the
    same clips (a row each: system, WER, CER, median per-clip WER, WER on every held-out clip), then
    what the audio adds to ours (the control's WER minus ours). Whisper's row says so when it was skipped."""
    s, enc = res.scores, res.config.encoder
    out = []
    for key, name in SYSTEM_NAMES.items():
        if f"clear_{key}_wer" not in s or (key == "ctc" and not (res.config.ctc_weight or res.config.projector == "lego")):
            continue
        out.append({"system": name.replace("Whisper's", f"Whisper {enc}'s"), "WER": s[f"clear_{key}_wer"], "CER": s[f"clear_{key}_cer"],
                    "median WER": s[f"clear_{key}_median_wer"], "WER, all styles": s[f"{key}_wer"]})
    if "clear_whisper_wer" not in s:
        out.append({"system": f"Whisper {enc}'s own decoder: not run (whisper_baseline=false)", "WER": float("nan"), "CER": float("nan"),
                    "median WER": float("nan"), "WER, all styles": float("nan")})
    out.append({"system": f"what the audio adds to ours ({res.config.decode}: control minus ours)", "WER": s["clear_control_wer"] - s["clear_wer"],
                "CER": s["clear_control_cer"] - s["clear_cer"], "median WER": s["clear_control_median_wer"] - s["clear_median_wer"],
                "WER, all styles": s["control_wer"] - s["wer"]})
    return out


def verdict(res: AlignResult) -> str:
    """One sentence from the scores: does ours listen (its shuffled-audio control far worse), and how far
    is it from Whisper's own decoder on the same clear clips."""
    s = res.scores
    gap = s["clear_control_wer"] - s["clear_wer"]
    listens = "listens" if gap >= 0.3 else "barely listens" if gap > 0.05 else "does not listen"
    out = (f"Ours ({res.config.decode}) {listens}: clear WER {s['clear_wer']:.3f} against {s['clear_control_wer']:.3f} with shuffled audio")
    if "clear_whisper_wer" in s:
        d = s["clear_wer"] - s["clear_whisper_wer"]
        out += f", {abs(d):.3f} {'below' if d < 0 else 'above'} Whisper {res.config.encoder}'s own decoder ({s['clear_whisper_wer']:.3f})"
    if "clear_ctc_wer" in s and (res.config.ctc_weight or res.config.projector == "lego" or res.config.run):
        d = s["clear_wer"] - s["clear_ctc_wer"]
        out += f"; the LM {'improves on' if d < 0 else 'does not improve on'} what the audio tokens spell alone ({s['clear_ctc_wer']:.3f})"
    return out + "."


def run(cfg: AlignConfig, tracker: Tracker | NullTracker | None = None, cache: FeatureCache | None = None) -> AlignResult:
    """Notebook 03's one call: train the audio path (and the LM's share, by `trainable`) on the cache's
    train split, score the held-out split, save to cfg.out. Under torchrun every rank draws the same
    global batch and trains on its share of it (DDP); rank 0 logs and saves."""
    tracker = tracker or NullTracker()
    rank, world, device_name = init_ddp(cfg.device)
    device = pick_device(device_name)
    if rank != 0:
        tracker = NullTracker()
    cache = cache or prepare_cache(cfg)
    check_layer(cfg, cache.n_states)
    built = build_model(cfg, cache.n_states, cache.d_model, device)
    model = built.model
    data = load_splits(cache, model.states_read())
    batches = StepBatches(cache, data.train, data.train_states, cfg.batch_size, cfg.seed)
    curves = Curves()
    if cfg.steps:
        hist = train(trainable_parameters(built), partial(step_loss, model=model, cfg=cfg, device=device, batches=batches, rank=rank, world=world),
                     train_config(cfg, rank), tracker, eval_fn=partial(eval_step, model=model, cfg=cfg, cache=cache, data=data, curves=curves))
    else:  # an evaluation of the started run as it is
        hist = History()
    test, scores, chosen = evaluate(cfg, built, cache, data, hist)
    tracker.log_metrics(scores, step=cfg.steps)
    res = AlignResult(cfg, hist, model, test, scores, curves.layer_weights, curves.wer)
    if rank == 0:
        tracker.flush()  # the tracker buffers: unflushed, the final scores never reach MLflow
        if cfg.out:
            save_run(built, cfg, cache, "alignment", {"scores": scores}, ctc_head=has_ctc_head(cfg, built), decoding=chosen)
            tracker.log_artifact(cfg.out, artifact_path="model")
    return res
