"""Instruction tuning on conversations about audio, with the one training loop (omni.train.train):
what the instruct experiment (omni.experiments.instruct) trains before it asks the benchmark.

A conversation (omni.data.manifest's format, e.g. from omni.data.instructions) becomes one token
sequence, the audio spliced in where its tag stands, laid out as prose would be:

    [BOS]User:<audio tokens of clip 1><audio tokens of clip 2> Same speaker?\\nAssistant: no[EOS]User: ...

Design choices:
- Answers are tokenised as the LM met words in pretraining: the role word ends with its colon
  ("Assistant:") and the answer follows with its leading space (" female", " higher"), so a label is
  one or two whole-word tokens whose first token names it, not a lone space then h|ig|her. User text
  after a role word or a clip starts with its space likewise. The answer ends with the tokenizer's
  EOS (omni's and nanochat's: the BOS token; Hugging Face: its eos), where generation stops.
- The loss is on assistant turns only (each answer's tokens and the EOS that closes it) and is
  averaged per turn, then per conversation, then over the batch: a one-word answer weighs as much
  as a 25-word transcript, and a three-turn conversation as much as a one-turn question.
- Batches follow a task mix (`texture_share`): that share of each batch is texture questions
  (omni.data.instructions.TEXTURE_TASKS, equally per task), the rest the other tasks (transcription,
  content checks, multi-turn chains), equally per task; within a task each answer is drawn equally
  often (`balance_answers`), so a task's training prior is flat and only the audio separates its
  answers (the held-out voices' label mix differs from training's: two of three held-out variants
  are female, and two of three training voices male).
- With `voice_at_answer`, the clip's voice tokens (SpeechLMConfig.voice_tokens) stand again just before
  each "Assistant:" (a `Voice` item): the listening ladder found the voice in the audio tokens and lost
  in the LM's state where the answer is read, a hop of attention from the start of the conversation.
- Audio sits where its tag stands, not only as a prefix: the sequence is assembled as embeddings
  (text through the LM's own `embed`, each clip through SpeechLM's `audio_tokens`) and run with
  `embeds=` (omni's GPT and Hugging Face LMs alike), so any turn may carry audio anywhere.
- Sequences are right-padded with target -1: the attention is causal, so padding after a
  sequence cannot change it, and the fast is_causal path stays on.
- Clips come from the Whisper feature cache (omni.data.features), looked up by absolute audio path:
  the encoder never runs during training. A conversation naming a clip missing from the cache is
  an error before training starts.
- Batches are drawn from a Random seeded by (seed, step), so a run is reproducible and a resumed
  run draws the same batches. `trainable` is "projector+lora" (default: peft adapters on the LM's
  attention and MLP projections through omni.model.lm, exactly as omni.experiments.alignment; the base weights stay
  bit-identical and only the adapters are saved, beside the audio path), "projector" (frozen LM)
  or "projector+lm" (the whole LM trains and is saved as a copy). `run` starts the audio path (layer
  choice + projector, with their shape) from a trained run, e.g. an alignment run on the same LM.
- Answers for the benchmark (`answerer`) are greedy, with the LM's KV cache: the conversation so far
  goes in as a left-padded prefix of embeddings (the LM's one decoding loop, `generate`), together
  with the token ids of its text (`audio_idx`), so omni's GPT gives that text the value embeddings it
  had in training; without them a nanochat-style LM would read its question differently than it
  learned to.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F

from omni.data.features import FeatureCache
from omni.data.instructions import TEXTURE_TASKS, answer_value
from omni.data.manifest import ASSISTANT_ROLES, USER_ROLES, read_manifest
from omni.experiments.audio_run import AudioRunConfig, Built, build_model, check_layer, run_meta, save_run, trainable_parameters
from omni.model.encoder import collate_states
from omni.model.speech_lm import SpeechLM, left_pad
from omni.params import require
from omni.track import NullTracker, Tracker
from omni.train import History, TrainConfig, pick_device, train

USER, ASSISTANT = "User:", "Assistant:"  # role words; what follows each starts with its own space

Segment = str | Path  # text, or the resolved path of a clip


@dataclass(frozen=True)
class Voice:
    """An item of an encoded conversation: the voice tokens of `clip` again (TuningConfig.voice_at_answer)."""

    clip: Path


Item = int | Path | Voice  # a token id, a clip's audio tokens, or a clip's voice tokens
Conversation = list[tuple[str, list[Segment]]]  # (role, segments in order)
Watch = Callable[[SpeechLM, int], dict[str, float]]  # metrics of the model at a step (held-out accuracy, ...)


@dataclass
class TuningConfig(AudioRunConfig):
    instructions: str = "data/instructions"  # folder with train.jsonl and val.jsonl (omni data instructions)
    texture_share: float = 0.85  # share of each batch drawn from the texture tasks (equally per task); the rest from transcription, content and multi-turn rows
    balance_answers: bool = True  # within a task, draw each answer equally often: a flat prior per task, so only the audio separates the answers
    val_rows: int = 64  # val conversations in each val-loss evaluation (a seeded subsample: the full split costs minutes on CPU); 0 = all
    perception_steps: int = 0  # the first steps train on voice captions alone ("describe": perception first, as LTU), then the task mix
    voice_at_answer: bool = False  # the clip's voice tokens again just before each "Assistant:", two positions from where the answer is read (the ladder finds the voice in the audio tokens but not in the LM's state at the answer); needs voice_tokens

    ALIASES: ClassVar[dict[str, str]] = {"audio_path": "run"}  # old parameter names, accepted until the next release

    def __post_init__(self) -> None:
        """Types and ranges, refused in one line naming the parameter before any data or LM is read."""
        super().__post_init__()
        require(self.val_rows >= 0, "val_rows", self.val_rows, ">= 0")
        require(0 <= self.perception_steps <= self.steps, "perception_steps", self.perception_steps, f"in [0, steps={self.steps}]")
        require(0 <= self.texture_share <= 1, "texture_share", self.texture_share, "in [0, 1]")
        require(self.voice_tokens > 0 or not self.voice_at_answer, "voice_at_answer", self.voice_at_answer, "only with voice_tokens > 0")


@dataclass
class TuningResult:
    config: TuningConfig
    history: History  # history.evals: val losses and whatever `watch` measured, per evaluation
    model: SpeechLM
    val_loss: float


def read_examples(path: str | Path) -> tuple[list[Conversation], list[dict]]:
    """(conversations, their rows' labels) of a manifest (validated by read_manifest, audio not opened:
    the cache has it), each turn split into text and audio segments in the order they are written."""
    path = Path(path)
    convs, labels = [], []
    for e in read_manifest(path, check_audio=False).examples:
        if e.turns is None:
            raise ValueError(f"{path}:{e.line}: a flat row; instruction tuning needs conversation rows")
        convs.append([(t.role, [s.resolve() if isinstance(s, Path) else s for s in t.segments]) for t in e.turns])
        labels.append(e.labels)
    return convs, labels


def read_conversations(path: str | Path) -> list[Conversation]:
    """The conversations of a manifest (read_examples without the labels)."""
    return read_examples(path)[0]


def encode(conv: Conversation, tok, voice_at_answer: bool = False) -> tuple[list[Item], list[int]]:
    """Token ids (a Path where a clip goes; with `voice_at_answer` a Voice of the last clip before each
    "Assistant:") and, per item, the index of the assistant turn it is a trained token of (the answer's
    tokens and its closing EOS), -1 for context (user and system text, audio, role words)."""
    items: list[Item] = [tok.bos_id]
    turn = [-1]
    n_answers = 0
    for role, segs in conv:
        if role in ASSISTANT_ROLES:
            head = voice_before(items, voice_at_answer) + tok.encode(ASSISTANT)
            body = tok.encode(" " + " ".join(s for s in segs if isinstance(s, str))) + [tok.eos_id]
            items += head + body
            turn += [-1] * len(head) + [n_answers] * len(body)
            n_answers += 1
            continue
        head = tok.encode(USER) if role in USER_ROLES else []
        items += head
        turn += [-1] * len(head)
        for s in segs:
            # text after a role word or a clip starts with its space, as in prose; a system text opens the line
            ids = [s] if isinstance(s, Path) else tok.encode(s if not head and len(items) == 1 else " " + s)
            items += ids
            turn += [-1] * len(ids)
        nl = tok.encode("\n")
        items += nl
        turn += [-1] * len(nl)
    return items, turn


def voice_before(items: list[Item], voice_at_answer: bool) -> list[Item]:
    """[Voice(the last clip in items)] where the conversation repeats the voice before an answer, else []."""
    clips = [s for s in items if isinstance(s, Path)]
    return [Voice(clips[-1])] if voice_at_answer and clips else []


def prompt(conv: Conversation, tok, voice_at_answer: bool = False) -> list[Item]:
    """The sequence a model answers from: the conversation so far, then the assistant's role word."""
    items = encode(conv, tok, voice_at_answer)[0]
    return items + voice_before(items, voice_at_answer) + tok.encode(ASSISTANT)


def assemble(model: SpeechLM, seqs: Sequence[list[Item]], states: dict[Path, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[Path | Voice, int]]:
    """(idx (B, L), embeds (B, L, D), lengths (B,), soft tokens per clip and per Voice): each sequence's
    clips expanded into their audio tokens (a Voice into its clip's first voice_tokens of them),
    right-padded; idx holds -1 at audio positions (not tokens: only embeds is read there, and they get
    no value embedding) and 0 at padding."""
    device = model.gpt_device
    clips = sorted({s for seq in seqs for s in seq if isinstance(s, Path)})
    tokens, n_tok = None, {}
    if clips:
        hidden, frames = collate_states([states[c].float() for c in clips])
        audio, lengths = model.audio_tokens(hidden.to(device), frames.to(device))
        tokens = {c: audio[i, : int(lengths[i])] for i, c in enumerate(clips)}
        n_tok = {c: int(lengths[i]) for i, c in enumerate(clips)}
        for v in {s for seq in seqs for s in seq if isinstance(s, Voice)}:
            tokens[v] = tokens[v.clip][: model.config.voice_tokens]  # the clip's tokens begin with its voice tokens
            n_tok[v] = model.config.voice_tokens
    rows, where = [], []  # ids per sequence; (batch, start, clip or Voice) of each soft span
    for b, seq in enumerate(seqs):
        ids: list[int] = []
        for s in seq:
            if not isinstance(s, int):
                where.append((b, len(ids), s))
                ids += [-1] * n_tok[s]
            else:
                ids.append(s)
        rows.append(ids)
    L = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), L, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        idx[b, : len(r)] = torch.tensor(r, device=device)
    embeds = model.gpt.embed(idx.clamp(min=0))
    if where:
        bi = torch.cat([torch.full((n_tok[c],), b, device=device) for b, _, c in where])
        pi = torch.cat([torch.arange(p, p + n_tok[c], device=device) for _, p, c in where])
        vals = torch.cat([tokens[c] for _, _, c in where]).to(embeds.dtype)
        embeds = embeds.index_put((bi, pi), vals)  # out of place: gradients reach the projector
    return idx, embeds, torch.tensor([len(r) for r in rows], device=device), n_tok


def expand(seq: list[Item], per_item: list, n_tok: dict[Path | Voice, int], fill) -> list:
    """A per-item list stretched over each clip's (or Voice's) soft tokens (`fill` there: audio is never a target)."""
    out: list = []
    for s, m in zip(seq, per_item):
        out += [fill] * n_tok[s] if not isinstance(s, int) else [m]
    return out


def conversation_batch(model: SpeechLM, convs: Sequence[Conversation], states: dict[Path, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, embeds, targets, weights) of a batch: targets[b, p] is the token at p + 1 where that token
    is an assistant token to predict, else -1 (user text, audio, role words, padding); weights[b, p]
    is 1 / (tokens of its turn x assistant turns of its conversation), so each conversation's
    weights sum to 1 (the per-turn, then per-conversation mean)."""
    encoded = [encode(c, model.tokenizer, model.config.voice_at_answer) for c in convs]
    idx, embeds, _, n_tok = assemble(model, [s for s, _ in encoded], states)
    targets = torch.full_like(idx, -1)
    weights = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
    for b, (seq, turn) in enumerate(encoded):
        t = expand(seq, turn, n_tok, -1)[1:]  # the turn of the token each position predicts
        size = collections.Counter(x for x in t if x >= 0)
        w = [1.0 / (size[x] * len(size)) if x >= 0 else 0.0 for x in t]
        targets[b, : len(t)] = torch.where(torch.tensor(t, device=idx.device) >= 0, idx[b, 1 : len(t) + 1], -1)
        weights[b, : len(t)] = torch.tensor(w, device=idx.device)
    return idx, embeds, targets, weights


def conversation_losses(model: SpeechLM, convs: Sequence[Conversation], states: dict[Path, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Each conversation's loss (B,): cross-entropy over its assistant tokens, averaged per turn, then
    over its turns; and the count of assistant tokens."""
    idx, embeds, targets, weights = conversation_batch(model, convs, states)
    logits = model.gpt(idx, embeds=embeds)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().clamp(min=0), reduction="none").view_as(targets)
    return (ce * weights).sum(dim=1), int((targets >= 0).sum())


def conversation_loss(model: SpeechLM, convs: Sequence[Conversation], states: dict[Path, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The batch's loss (the mean of conversation_losses) and its count of assistant tokens."""
    losses, n = conversation_losses(model, convs, states)
    return losses.mean(), n


# --- the task mix --------------------------------------------------------------------------------


def mix_pools(labels: Sequence[dict], balance_answers: bool = True) -> dict[str, dict[str, dict[str, list[int]]]]:
    """{"texture" | "other": {task: {answer: [row indices]}}}: what `draw` samples from. Answers are
    in words (a multiple-choice row's option text); rows of open tasks and multi-turn chains, and every
    row without balance_answers, share the answer key ""."""
    pools: dict[str, dict[str, dict[str, list[int]]]] = {"texture": {}, "other": {}}
    for i, r in enumerate(labels):
        task = r.get("task", "")
        key = answer_value(r) if balance_answers and r.get("options") and task != "multi_turn" else ""
        group = "texture" if task in TEXTURE_TASKS else "other"
        pools[group].setdefault(task, {}).setdefault(key, []).append(i)
    return pools


def draw(pools: dict, n: int, texture_share: float, rng: random.Random) -> list[int]:
    """n row indices: each from the texture group with probability texture_share (else the other
    group; an empty group gives way to the other), then a task, then an answer, then a row, each
    uniformly."""
    out = []
    for _ in range(n):
        group = "texture" if rng.random() < texture_share else "other"
        if not pools[group]:
            group = "other" if group == "texture" else "texture"
        tasks = pools[group]
        by_answer = tasks[rng.choice(sorted(tasks))]
        out.append(rng.choice(by_answer[rng.choice(sorted(by_answer))]))
    return out


# --- training ------------------------------------------------------------------------------------


def clip_rows(cache: FeatureCache) -> dict[Path, int]:
    """Resolved audio path -> the cache row holding its states."""
    return {Path(r["audio"]).resolve(): i for i, r in enumerate(cache.rows)}


def _states_for(cache: FeatureCache, convs: Sequence[Conversation], where: str, by_audio: dict[Path, int] | None = None) -> dict[Path, torch.Tensor]:
    by_audio = by_audio if by_audio is not None else clip_rows(cache)
    clips = sorted({s for c in convs for _, segs in c for s in segs if isinstance(s, Path)})
    missing = [c for c in clips if c not in by_audio]
    if missing:
        raise ValueError(f"{where}: {len(missing)} clip(s) not in the feature cache {cache.path}, e.g. {missing[0]}")
    return dict(zip(clips, cache.load_states([by_audio[c] for c in clips])))


def check_lengths(model: SpeechLM, convs: Sequence[Conversation], states: dict[Path, torch.Tensor], where: str) -> int:
    """The longest conversation in tokens (audio included); a ValueError naming the row if one is over
    the LM's sequence_len, before any training step."""
    max_len, longest = model.gpt.config.sequence_len, 0
    for i, c in enumerate(convs):
        seq, _ = encode(c, model.tokenizer, model.config.voice_at_answer)
        # a clip: its audio tokens and the voice tokens before them; a Voice: those again
        n = sum(model.config.voice_tokens + (int(model.projector.token_lengths(torch.tensor(states[s].size(1)))) if isinstance(s, Path) else 0)
                if not isinstance(s, int) else 1 for s in seq)
        if n > max_len:
            raise ValueError(f"{where}: row {i + 1} is {n} tokens with its audio, over the LM's sequence_len={max_len}")
        longest = max(longest, n)
    return longest


def tune(cfg: TuningConfig, cache: FeatureCache | None = None, built: Built | None = None,
         tracker: Tracker | NullTracker | None = None, watch: Watch | None = None) -> TuningResult:
    """Train on OUT/train.jsonl's conversations, report the loss on val.jsonl; save to cfg.out.
    Per-step metrics (loss, lr) go to `tracker`; at every evaluation val_loss (the per-conversation
    mean), val_texture_loss (texture questions only) and whatever `watch(model, step)` returns."""
    folder = Path(cfg.instructions)
    train_convs, train_labels = read_examples(folder / "train.jsonl")
    val_convs, val_labels = read_examples(folder / "val.jsonl") if (folder / "val.jsonl").is_file() else ([], [])
    if cfg.val_rows and len(val_convs) > cfg.val_rows:
        keep = sorted(random.Random(f"{cfg.seed}:val").sample(range(len(val_convs)), cfg.val_rows))
        val_convs, val_labels = [val_convs[i] for i in keep], [val_labels[i] for i in keep]
    cache = cache or FeatureCache.open(cfg.features)
    train_states = _states_for(cache, train_convs, str(folder / "train.jsonl"))
    val_states = _states_for(cache, val_convs, str(folder / "val.jsonl")) if val_convs else {}
    device = pick_device(cfg.device)
    check_layer(cfg, cache.n_states)
    built = built or build_model(cfg, cache.n_states, cache.d_model, device)
    model = built.model
    check_lengths(model, train_convs, train_states, str(folder / "train.jsonl"))
    check_lengths(model, val_convs, val_states, str(folder / "val.jsonl"))
    model.train()
    model.gpt.train(bool(built.lm_params))
    pools = mix_pools(train_labels, cfg.balance_answers)

    captions = [i for i, r in enumerate(train_labels) if r.get("task") == "describe"]
    if cfg.perception_steps and not captions:
        raise ValueError(f"{folder / 'train.jsonl'}: no voice captions (task describe) for perception_steps={cfg.perception_steps}; "
                         "rebuild the instructions (omni data instructions) or set perception_steps=0")

    def loss_fn(step: int):
        rng = random.Random(f"{cfg.seed}:batch:{step}")
        if step < cfg.perception_steps:  # perception first: captions of the voice, no questions yet
            rows = [rng.choice(captions) for _ in range(cfg.batch_size)]
        else:
            rows = draw(pools, cfg.batch_size, cfg.texture_share, rng)
        return conversation_loss(model, [train_convs[i] for i in rows], train_states)

    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, dtype=cfg.dtype, progress=False, eval_every=cfg.eval_every,
                       lora_grad_clip=cfg.lora_grad_clip, lm_lr=cfg.lm_lr, max_bad_steps=cfg.max_bad_steps, early_lr_factor=cfg.early_lr_factor,
                       early_steps=cfg.early_steps, freeze_projector_steps=cfg.freeze_projector_steps,
                       ckpt_every=max(1, cfg.steps // 4) if cfg.out else 0, ckpt_dir=str(Path(cfg.out) / "resume") if cfg.out else "")
    val_texture = [i for i, r in enumerate(val_labels) if r.get("task") in TEXTURE_TASKS]

    def eval_fn(step: int) -> dict[str, float]:  # train() calls it every eval_every steps and at the end
        out: dict[str, float] = {}
        if val_convs:
            losses = evaluate_losses(model, val_convs, val_states, cfg.batch_size)
            out["val_loss"] = float(losses.mean())
            if val_texture:
                out["val_texture_loss"] = float(losses[val_texture].mean())
        if watch is not None:
            was = model.training
            out |= watch(model, step)
            model.train(was)
            model.gpt.train(was and bool(built.lm_params))
        return out

    hist = train(trainable_parameters(built), loss_fn, tcfg, tracker, eval_fn=eval_fn if (val_convs or watch) else None)
    val_loss = hist.evals[-1]["val_loss"] if val_convs else float("nan")
    if cfg.out:
        save_run(built, cfg, cache, "tuning", {"instructions": str(folder.resolve()), "val_loss": val_loss},
                 ctc_head=bool(built.start and run_meta(built.start)[1].get("ctc_head")))
    return TuningResult(cfg, hist, model, val_loss)


@torch.no_grad()
def evaluate_losses(model: SpeechLM, convs: Sequence[Conversation], states: dict[Path, torch.Tensor], batch_size: int) -> torch.Tensor:
    """Each conversation's loss (the per-turn, then per-conversation mean of training), in order."""
    was = model.training
    model.eval()
    out = [conversation_losses(model, convs[i : i + batch_size], states)[0].cpu() for i in range(0, len(convs), batch_size)]
    model.train(was)
    return torch.cat(out)


def evaluate_loss(model: SpeechLM, convs: Sequence[Conversation], states: dict[Path, torch.Tensor], batch_size: int) -> float:
    """The mean conversation loss over `convs`."""
    return float(evaluate_losses(model, convs, states, batch_size).mean())


# --- answering -----------------------------------------------------------------------------------


def question_conversation(q: dict) -> Conversation:
    """A benchmark question row (omni.eval.texture.load_questions) as a one-turn conversation, its clips
    where the question has them ("segments"; rows without: the clips first)."""
    audios = [Path(a).resolve() for a in q["audios"]]
    segs = q.get("segments")
    if segs is None:
        return [("user", [*audios, q["question"]])]
    return [("user", [audios[s] if isinstance(s, int) else s for s in segs])]


@torch.no_grad()
def greedy(model: SpeechLM, seqs: Sequence[list[Item]], states: dict[Path, torch.Tensor], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of `seqs` until EOS (left out) or max_new_tokens, with the LM's KV cache:
    each sequence but its last token goes in as a left-padded prefix of embeddings, carrying the token
    ids of its text (`audio_idx`, so omni's GPT gives that text its value embeddings, as in training),
    the last token as idx. The same numbers as training's right-padded forward (up to float rounding)."""
    eos = model.tokenizer.eos_id
    idx, embeds, lengths, _ = assemble(model, seqs, states)
    B, L = idx.shape
    budget = min(max_new_tokens, model.gpt.config.sequence_len - (L - 1))  # the LM's context bounds the answer
    if budget < 1:
        return [[] for _ in seqs]
    n = lengths - 1  # the prefix: all but the last token
    prefix, mask = left_pad(embeds[:, : L - 1], n)
    pos = torch.arange(L - 1, device=idx.device)[None, :]
    shift = (L - 1 - n)[:, None]
    ids = idx[:, : L - 1].gather(1, (pos - shift).clamp(min=0))
    prefix_ids = torch.where(mask, ids, torch.full_like(ids, -1))  # -1: audio and padding have no token
    last = idx[torch.arange(B, device=idx.device), lengths - 1][:, None]
    out = model.gpt.generate(last, audio=prefix, audio_mask=mask, audio_idx=prefix_ids, max_new_tokens=budget, stop_token=eos)
    return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]


def answer_budget(q: dict, tok, max_new_tokens: int) -> int:
    """Decoding steps for a closed question: its longest allowed answer (an option with its space, a
    letter, "B) option") and EOS, capped by max_new_tokens; an open question gets max_new_tokens.
    A longer answer could not be right, so decoding further only costs time."""
    if not q.get("options"):
        return max_new_tokens
    longest = max(len(tok.encode(f" {chr(65 + len(q['options']) - 1)}) {o}")) for o in q["options"])
    return min(max_new_tokens, longest + 1)


def answerer(model: SpeechLM, cache: FeatureCache, max_new_tokens: int = 12, transcribe_tokens: int = 48):
    """A benchmark answerer (omni.eval.texture): greedy answers to question rows ("question", "audios",
    "segments"), each asked as it was written. A batch holding a transcription question gets
    `transcribe_tokens` (a sentence of at most 25 words, not a label); a closed question as many
    tokens as its longest allowed answer and EOS (answer_budget); omni.eval.texture.ask batches one task
    at a time, so label batches stay short."""
    tok = model.tokenizer
    by_audio = clip_rows(cache)

    def answer(qs: list[dict]) -> list[str]:
        was = model.training
        model.eval()
        convs = [question_conversation(q) for q in qs]
        states = _states_for(cache, convs, "the benchmark's questions", by_audio)
        # each question its own budget (the batch decodes to the largest), so an answer never depends on its batch
        budgets = [transcribe_tokens if q.get("task") == "transcribe" else answer_budget(q, tok, max_new_tokens) for q in qs]
        out = greedy(model, [prompt(c, tok, model.config.voice_at_answer) for c in convs], states, max(budgets))
        model.train(was)
        return [tok.decode(row[:n]).strip() for row, n in zip(out, budgets)]

    return answer
