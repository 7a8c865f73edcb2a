"""Instruction tuning on conversations about audio, with the one training loop (omni.train.train):
what the instruct experiment (omni.experiments.instruct) trains before it asks the benchmark.

A conversation (omni.data.manifest's format, e.g. from omni.data.instructions) becomes one token
sequence, the audio spliced in where its tag stands:

    [BOS] User: <audio tokens of clip 1> <audio tokens of clip 2> Same speaker?\\n Assistant: no[BOS] User: ...

Design choices:
- The loss is on assistant turns only: each answer's tokens and the BOS that closes it (BOS doubles
  as end-of-text, as in omni.model.speech_lm, so generation stops on it). User text, audio, the role
  words and system text are context with target -1.
- Audio sits where its tag stands, not only as a prefix: the sequence is assembled as embeddings
  (text through the GPT's own `embed`, each clip through SpeechLM's `audio_tokens`) and run through
  the GPT with `embeds=` (a small keyword of GPT.forward), so any turn may carry audio anywhere.
- Sequences are right-padded with target -1: the attention is causal, so padding after a
  sequence cannot change it, and the fast is_causal path stays on.
- Clips come from the Whisper feature cache (omni.data.features), looked up by absolute audio path:
  the encoder never runs during training. A conversation naming a clip missing from the cache is
  an error before training starts.
- Batches are drawn from a Random seeded by (seed, step), so a run is reproducible and a resumed
  run draws the same batches. `trainable` is "projector+lora" (default: peft adapters on the LM's
  attention and MLP projections through omni.model.lm, exactly as omni.experiments.alignment; the base weights stay
  bit-identical and only the adapters are saved, beside the audio path), "projector" (frozen LM)
  or "projector+lm" (the whole LM trains and is saved as a copy).
- Answers for the benchmark (`answerer`) are greedy: the prompt up to "Assistant: " minus its last
  token goes in as GPT's left-padded soft prefix, its last token as idx, so the one decoding loop
  (GPT.stream) is used as it is.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch

from omni.data.features import FeatureCache
from omni.data.manifest import ASSISTANT_ROLES, AUDIO_TAG, USER_ROLES, read_manifest
from omni.experiments.trained import model_dir
from omni.model.encoder import collate_states, require_layer
from omni.model.lm import LoraSpec, load_lm, save_lora
from omni.model.projector import Projector, ProjectorConfig
from omni.model.speech_lm import TRAINABLE, SpeechLM, SpeechLMConfig, left_pad, lm_parameters
from omni.params import require, require_choice, require_device
from omni.track import NullTracker, Tracker
from omni.train import DTYPES, History, TrainConfig, pick_device, train

USER, ASSISTANT = "User: ", "Assistant: "

Segment = str | Path  # text, or the resolved path of a clip
Conversation = list[tuple[str, list[Segment]]]  # (role, segments in order)


@dataclass
class TuningConfig:
    instructions: str = "data/instructions"  # folder with train.jsonl and val.jsonl (omni data instructions)
    features: str = ""  # feature cache folder (FeatureCache) holding every clip the conversations name
    lm: str = "runs/lm"  # pretrained LM folder (GPT.save + tokenizer.json, or bytes)
    run: str = ""  # a trained run to start the audio path (layer choice + projector) from: folder, report folder or MLflow run id; "" = fresh
    layer: str = "weighted"  # Whisper state(s) for the projector (as omni.model.speech_lm)
    k: int = 4  # frames per audio token
    projector: str = "stack"  # stack | conv | avg
    trainable: str = "projector+lora"  # projector+lora (peft adapters) | projector (frozen LM) | projector+lm (whole LM)
    lora_rank: int = 16  # LoRA rank r (trainable=projector+lora)
    lora_alpha: float = 32.0  # LoRA scale alpha / r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = ""  # comma-separated module names; "" = attention + MLP projections of the backbone
    steps: int = 150  # optimiser steps (about 2.5 s each on 2 shared CPU cores at batch 8)
    batch_size: int = 8  # conversations per step
    lr: float = 2e-3  # AdamW peak learning rate
    warmup: int = 10  # linear warm-up steps
    eval_every: int = 0  # steps between val-loss evaluations; 0 = only at the end
    val_rows: int = 128  # val conversations in each val-loss evaluation (a seeded subsample: the full split costs minutes on CPU); 0 = all
    seed: int = 0  # batches, init
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs float32
    out: str = ""  # folder for the trained audio path (and adapters or LM); "" = not saved

    ALIASES: ClassVar[dict[str, str]] = {"audio_path": "run"}  # old parameter names (issue 21), accepted until the next release

    def __post_init__(self) -> None:
        """Types and ranges, refused in one line naming the parameter before any data or LM is read."""
        require_choice("trainable", self.trainable, TRAINABLE)
        for name in ("steps", "k", "batch_size", "lora_rank"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("warmup", "eval_every", "val_rows", "seed"):
            require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        require(self.lr > 0, "lr", self.lr, "> 0")
        require(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "> 0")
        require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")
        require_choice("dtype", self.dtype, DTYPES)
        require_layer(self.layer, "")  # by name here; an index is checked against the cache when it is opened
        require_device(self.device)
        Projector(ProjectorConfig(d_in=1, d_out=1, k=self.k, kind=self.projector))  # raises naming `projector` or `k`

    def lora(self) -> LoraSpec:
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)


@dataclass
class TuningResult:
    config: TuningConfig
    history: History
    model: SpeechLM
    val_loss: float


def read_conversations(path: str | Path) -> list[Conversation]:
    """Conversations of a manifest (validated by read_manifest, audio not opened: the cache has it),
    each turn split into text and audio segments in the order they are written."""
    path = Path(path)
    examples = read_manifest(path, check_audio=False).examples
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for e in examples:
        if e.turns is None:
            raise ValueError(f"{path}:{e.line}: a flat row; instruction tuning needs conversation rows")
        conv: Conversation = []
        for t in json.loads(lines[e.line - 1])["conversations"]:
            parts = AUDIO_TAG.split(t["value"])  # text, path, text, path, ..., text
            segs: list[Segment] = []
            for i, part in enumerate(parts):
                if i % 2:
                    p = Path(part.strip()).expanduser()
                    segs.append(Path((p if p.is_absolute() else path.parent / p).resolve()))
                elif part.strip():
                    segs.append(" ".join(part.split()))
            conv.append((t["from"].strip().lower(), segs))
        out.append(conv)
    return out


def encode(conv: Conversation, tok) -> tuple[list[int | Path], list[bool]]:
    """Token ids (a Path where a clip goes) and, per position, whether it is an assistant token to
    predict (answer tokens and their closing BOS)."""
    items: list[int | Path] = [tok.bos_id]
    train_mask = [False]
    for role, segs in conv:
        if role in ASSISTANT_ROLES:
            head, body = tok.encode(ASSISTANT), tok.encode(" ".join(s for s in segs if isinstance(s, str))) + [tok.bos_id]
            items += head + body
            train_mask += [False] * len(head) + [True] * len(body)
            continue
        head = tok.encode(USER if role in USER_ROLES else "")
        items += head
        train_mask += [False] * len(head)
        for j, s in enumerate(segs):
            ids = [s] if isinstance(s, Path) else tok.encode((" " if j else "") + s)
            items += ids
            train_mask += [False] * len(ids)
        nl = tok.encode("\n")
        items += nl
        train_mask += [False] * len(nl)
    return items, train_mask


def assemble(model: SpeechLM, seqs: Sequence[list[int | Path]], states: dict[Path, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[Path, int]]:
    """(idx (B, L), embeds (B, L, D), lengths (B,), audio tokens per clip): each sequence's clips
    expanded into their audio tokens, right-padded; idx holds -1 at audio positions (not tokens: only
    embeds is read there, and they get no value embedding) and 0 at padding."""
    device = model.gpt_device
    clips = sorted({s for seq in seqs for s in seq if isinstance(s, Path)})
    tokens, n_tok = None, {}
    if clips:
        hidden, frames = collate_states([states[c].float() for c in clips])
        audio, lengths = model.audio_tokens(hidden.to(device), frames.to(device))
        tokens = {c: audio[i, : int(lengths[i])] for i, c in enumerate(clips)}
        n_tok = {c: int(lengths[i]) for i, c in enumerate(clips)}
    rows, where = [], []  # ids per sequence; (batch, start, clip) of each audio span
    for b, seq in enumerate(seqs):
        ids: list[int] = []
        for s in seq:
            if isinstance(s, Path):
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


def expand_mask(seq: list[int | Path], mask: list[bool], n_tok: dict[Path, int]) -> list[bool]:
    """A per-item mask stretched over each clip's audio tokens (audio is never a target)."""
    out: list[bool] = []
    for s, m in zip(seq, mask):
        out += [False] * n_tok[s] if isinstance(s, Path) else [m]
    return out


def conversation_batch(model: SpeechLM, convs: Sequence[Conversation], states: dict[Path, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, embeds, targets) of a batch: targets[b, p] is the token at p + 1 where that token is an
    assistant token to predict, else -1 (user text, audio, role words, padding)."""
    encoded = [encode(c, model.tokenizer) for c in convs]
    idx, embeds, _, n_tok = assemble(model, [s for s, _ in encoded], states)
    targets = torch.full_like(idx, -1)
    for b, (seq, mask) in enumerate(encoded):
        m = expand_mask(seq, mask, n_tok)
        train_pos = torch.tensor(m[1:], device=idx.device)
        targets[b, : len(m) - 1] = torch.where(train_pos, idx[b, 1 : len(m)], -1)
    return idx, embeds, targets


def conversation_loss(model: SpeechLM, convs: Sequence[Conversation], states: dict[Path, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the assistant tokens of a batch of conversations, and their count."""
    idx, embeds, targets = conversation_batch(model, convs, states)
    return model.gpt(idx, targets=targets, embeds=embeds), int((targets >= 0).sum())


def _states_for(cache: FeatureCache, convs: Sequence[Conversation], where: str) -> dict[Path, torch.Tensor]:
    by_audio = {Path(r["audio"]).resolve(): i for i, r in enumerate(cache.rows)}
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
        seq, _ = encode(c, model.tokenizer)
        n = sum(int(model.projector.token_lengths(torch.tensor(states[s].size(1)))) if isinstance(s, Path) else 1 for s in seq)
        if n > max_len:
            raise ValueError(f"{where}: row {i + 1} is {n} tokens with its audio, over the LM's sequence_len={max_len}")
        longest = max(longest, n)
    return longest


def build_model(cfg: TuningConfig, cache: FeatureCache, device: torch.device) -> SpeechLM:
    gpt, tok = load_lm(cfg.lm, device)
    torch.manual_seed(cfg.seed)
    model = SpeechLM(gpt, tok, cache.n_states, cache.d_model, SpeechLMConfig(cfg.layer, cfg.k, cfg.projector)).to(device)
    if cfg.run:
        model.load_audio_path(model_dir(cfg.run, "run"))
    return model


def tune(cfg: TuningConfig, cache: FeatureCache | None = None, model: SpeechLM | None = None,
         tracker: Tracker | NullTracker | None = None) -> TuningResult:
    """Train on OUT/train.jsonl's conversations, report the loss on val.jsonl; save to cfg.out.
    Per-step metrics (loss, lr, val_loss) go to `tracker`."""
    require_choice("trainable", cfg.trainable, TRAINABLE)  # a config changed after construction, too
    folder = Path(cfg.instructions)
    train_convs = read_conversations(folder / "train.jsonl")
    val_convs = read_conversations(folder / "val.jsonl") if (folder / "val.jsonl").is_file() else []
    if cfg.val_rows and len(val_convs) > cfg.val_rows:
        val_convs = random.Random(f"{cfg.seed}:val").sample(val_convs, cfg.val_rows)
    cache = cache or FeatureCache.open(cfg.features)
    train_states = _states_for(cache, train_convs, str(folder / "train.jsonl"))
    val_states = _states_for(cache, val_convs, str(folder / "val.jsonl")) if val_convs else {}
    device = pick_device(cfg.device)
    model = model or build_model(cfg, cache, device)
    check_lengths(model, train_convs, train_states, str(folder / "train.jsonl"))
    check_lengths(model, val_convs, val_states, str(folder / "val.jsonl"))
    train_lm = cfg.trainable == "projector+lm"
    if cfg.trainable == "projector+lora":
        torch.manual_seed(cfg.seed)  # the adapters' init is part of the run
    # the base weights stay frozen unless the whole LM trains
    lm_params = {f"gpt.{n}": p for n, p in lm_parameters(model.gpt, cfg.trainable, cfg.lora()).items()}
    model.train()
    model.gpt.train(bool(lm_params))

    def loss_fn(step: int):
        rng = random.Random(f"{cfg.seed}:batch:{step}")
        batch = rng.sample(train_convs, min(cfg.batch_size, len(train_convs)))
        return conversation_loss(model, batch, train_states)

    params = {f"select.{n}": p for n, p in model.select.named_parameters()}
    params |= {f"projector.{n}": p for n, p in model.projector.named_parameters()}
    params |= lm_params
    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, dtype=cfg.dtype, progress=False, eval_every=cfg.eval_every,
                       ckpt_every=max(1, cfg.steps // 4) if cfg.out else 0, ckpt_dir=str(Path(cfg.out) / "resume") if cfg.out else "")

    def eval_fn(step: int) -> dict[str, float]:  # the val-loss curve; train() calls it at the end too
        return {"val_loss": evaluate_loss(model, val_convs, val_states, cfg.batch_size)}

    hist = train(params, loss_fn, tcfg, tracker, eval_fn=eval_fn if val_convs else None)
    val_loss = hist.evals[-1]["val_loss"] if val_convs else float("nan")
    if cfg.out:
        model.save_audio_path(cfg.out)
        meta = json.loads((Path(cfg.out) / "audio_path.json").read_text())
        lm_dir = Path(cfg.lm)
        if train_lm:
            lm_dir = Path(cfg.out) / "lm"
            model.gpt.save(lm_dir)
            if (Path(cfg.lm) / "tokenizer.json").exists():
                shutil.copy(Path(cfg.lm) / "tokenizer.json", lm_dir / "tokenizer.json")
        if cfg.trainable == "projector+lora":  # adapters only, beside the audio path; the base LM stays cfg.lm
            save_lora(model.gpt, cfg.lora(), cfg.out)
        meta |= {"lm": str(lm_dir.resolve()), "features": str(Path(cache.path).resolve()),
                 "instructions": str(folder.resolve()), "instruct": asdict(cfg), "val_loss": val_loss}
        (Path(cfg.out) / "audio_path.json").write_text(json.dumps(meta, indent=2))
    return TuningResult(cfg, hist, model, val_loss)


@torch.no_grad()
def evaluate_loss(model: SpeechLM, convs: Sequence[Conversation], states: dict[Path, torch.Tensor], batch_size: int) -> float:
    """Token-weighted mean loss over the assistant tokens of `convs`."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(convs), batch_size):
        loss, k = conversation_loss(model, convs[i : i + batch_size], states)
        total, n = total + loss.item() * k, n + k
    model.train(was)
    return total / max(1, n)


def answerer(model: SpeechLM, cache: FeatureCache, max_new_tokens: int = 24, transcribe_tokens: int = 80):
    """A benchmark answerer (omni.eval.texture): greedy answers to question rows ("question", "audios").
    A batch holding a transcription question gets `transcribe_tokens` (a sentence, not a label):
    omni.eval.texture.ask batches one task at a time, so label batches stay short."""
    tok = model.tokenizer

    @torch.no_grad()
    def answer(qs: list[dict]) -> list[str]:
        model.eval()
        convs = [[("user", [Path(a).resolve() for a in q["audios"]] + [q["question"]])] for q in qs]
        states = _states_for(cache, convs, "the benchmark's questions")
        seqs = [encode(c, tok)[0] + tok.encode(ASSISTANT) for c in convs]
        idx, embeds, lengths, _ = assemble(model, seqs, states)
        last = idx[torch.arange(len(seqs)), lengths - 1][:, None]
        prefix, mask = left_pad(embeds, lengths - 1)  # everything but the last token, padded on the left
        budget = transcribe_tokens if any(q.get("task") == "transcribe" for q in qs) else max_new_tokens
        out = model.gpt.generate(last, audio=prefix, audio_mask=mask, max_new_tokens=budget, stop_token=tok.bos_id)
        texts = []
        for row in out.tolist():
            row = row[: row.index(tok.bos_id)] if tok.bos_id in row else row
            texts.append(tok.decode(row).strip())
        return texts

    return answer
