"""The listening ladder: where is the voice lost between the audio and the answer?

For each texture task (gender, accent, rate, pitch, style), what a tuned model's inside still knows
about the voice, rung by rung, on the held-out clips (unseen voices):

    whisper       a linear probe on the Whisper state(s) the projector reads, mean over the clip
    audio_tokens  a linear probe on the audio tokens the projector writes, mean over the clip
    (voice_tokens a linear probe on the voice tokens alone, side by side, when the model has them:
                  the pooled voice is a path of its own beside the audio tokens, not a rung above them)
    lm_state      a linear probe on the LM's last hidden state at the answer position (the question asked)
    answer        the model's own answer, read from its logits: the option whose first token scores highest

Probes are fitted on training clips (and their questions), scored on the test questions as balanced
accuracy. Where the accuracy falls between two rungs is where the voice is lost. Beside the rungs:
the answer's logit margin (right option minus the best wrong one) with the clip's own audio, with
shuffled audio and with silence (Whisper's states of a silent clip), and the share of the answer
position's attention that lands on the audio tokens (mean over layers and heads).

Design choices:
- One forward per question (no decoding): the answer rung reads the first token of each option at
  the answer position, which is what a greedy first step chooses among the options; the model's
  free-form answers are the benchmark's (omni.experiments.instruct), not the ladder's.
- The LM's hidden state is what its output layer reads (a forward hook on `lm_head`); attention
  weights come from omni's GPT (GPT.attention_to, computed for the answer position only); an LM
  without it (Hugging Face) gets no attention figure.
- Probes are scikit-learn's logistic regression on standardised features (omni.eval.texture_baselines.fit_probe).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from omni.common import derangement
from omni.data.features import FeatureCache
from omni.eval.texture import REQUIRED_TASKS, balanced_accuracy
from omni.eval.texture_baselines import fit_probe
from omni.experiments.tuning import assemble, clip_rows, prompt, question_conversation
from omni.model.encoder import WhisperEncoder, collate_states
from omni.model.mel import SAMPLE_RATE
from omni.model.speech_lm import SpeechLM

RUNGS = ("whisper", "audio_tokens", "lm_state", "answer")


@dataclass
class Ladder:
    tasks: list[str]
    accuracy: dict[str, dict[str, float]]  # rung -> task -> balanced accuracy on the test questions
    margin: dict[str, dict[str, float]]  # "own" | "shuffled" | "silence" -> task -> mean logit margin of the right option
    answer_accuracy: dict[str, dict[str, float]]  # "own" | "shuffled" | "silence" -> task -> balanced accuracy of the answer rung
    attention: dict[str, float] = field(default_factory=dict)  # task -> share of the answer position's attention on audio (own audio)
    n_test: dict[str, int] = field(default_factory=dict)  # task -> test questions
    voice: dict[str, float] = field(default_factory=dict)  # task -> balanced accuracy of a probe on the voice tokens (empty: the model has none)
    chance: dict[str, float] = field(default_factory=dict)  # task -> 1 / the test answers' classes: a balanced accuracy's chance

    def table(self) -> list[dict]:
        """One row per task: every rung's accuracy, the margins, the attention share."""
        rows = []
        for t in self.tasks:
            row = {"task": t} | {r: self.accuracy[r].get(t, float("nan")) for r in RUNGS}
            if self.voice:
                row["voice_tokens"] = self.voice.get(t, float("nan"))
            row["chance"] = self.chance.get(t, float("nan"))
            row |= {f"answer, {k}": v.get(t, float("nan")) for k, v in self.answer_accuracy.items() if k != "own"}
            row |= {f"margin, {k}": v.get(t, float("nan")) for k, v in self.margin.items()}
            row |= {"attention on audio": self.attention.get(t, float("nan")), "questions": self.n_test.get(t, 0)}
            rows.append(row)
        return rows

    def where_lost(self) -> list[str]:
        """Per task, a sentence: the rung where accuracy falls most (the voice's largest loss). With
        voice tokens the second rung is the better of the two paths into the LM (audio or voice tokens)."""
        out = []
        for t in self.tasks:
            names = list(RUNGS)
            acc = [self.accuracy[r].get(t, float("nan")) for r in RUNGS]
            if t in self.voice:
                names[1] = "voice_tokens" if self.voice[t] > acc[1] else "audio_tokens"
                acc[1] = max(acc[1], self.voice[t])
            drops = [(acc[i] - acc[i + 1], names[i], names[i + 1]) for i in range(len(names) - 1) if not np.isnan(acc[i] - acc[i + 1])]
            if not drops:
                continue
            drop, a, b = max(drops)
            out.append(f"{t}: {', '.join(f'{r} {v:.2f}' for r, v in zip(names, acc))}; the largest fall, {drop:+.2f}, is from {a} to {b}")
        return out

    def metrics(self) -> dict[str, float]:
        out = {f"ladder.{r}.{t}": v for r, by in (self.accuracy | {"voice_tokens": self.voice}).items() for t, v in by.items()}
        out |= {f"ladder.margin_{k}.{t}": v for k, by in self.margin.items() for t, v in by.items()}
        out |= {f"ladder.attention.{t}": v for t, v in self.attention.items()}
        return out


def balanced(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Mean over the true classes of the share predicted right (the benchmark's balanced accuracy)."""
    return balanced_accuracy((t == p, t) for t, p in zip(y_true, y_pred))


@torch.no_grad()
def clip_features(model: SpeechLM, states: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(Whisper state the projector reads, audio tokens), each the mean over the clip: (N, d) arrays,
    and the voice tokens side by side (N, voice_tokens * n_embd), None when the model has none."""
    whisper, tokens, voice = [], [], []
    n_voice = model.config.voice_tokens if model.voice is not None else 0
    device = model.gpt_device
    for i in range(0, len(states), 64):
        hidden, frames = collate_states([s.float() for s in states[i : i + 64]])
        hidden, frames = hidden.to(device), frames.to(device)
        picked = model.select(hidden)
        out, lengths = model.audio_tokens(hidden, frames)
        for b in range(hidden.size(0)):
            whisper.append(picked[b, : int(frames[b])].mean(0).cpu().numpy())
            tokens.append(out[b, n_voice : int(lengths[b])].mean(0).float().cpu().numpy())  # the projector's tokens alone
            if n_voice:  # the voice tokens lead the audio tokens (SpeechLM.audio_tokens)
                voice.append(out[b, :n_voice].flatten().float().cpu().numpy())
    return np.stack(whisper), np.stack(tokens), (np.stack(voice) if voice else None)


@torch.no_grad()
def answer_position(model: SpeechLM, questions: Sequence[dict], states: dict[Path, torch.Tensor], attention: bool = False,
                    batch_size: int = 32) -> tuple[np.ndarray, torch.Tensor, list[float]]:
    """For each question, at the position where the answer starts: the LM's hidden state (N, n_embd),
    its logits (N, vocab), and (with `attention`, omni's GPT only) the share of that position's
    attention on the audio tokens."""
    tok = model.tokenizer
    head = model.gpt.lm_head if hasattr(model.gpt, "lm_head") else model.gpt.model.lm_head
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    hidden, logits, att = [], [], []
    try:
        for i in range(0, len(questions), batch_size):
            seqs = [prompt(question_conversation(q), tok, model.config.voice_at_answer) for q in questions[i : i + batch_size]]
            idx, embeds, lengths, _ = assemble(model, seqs, states)
            seen.clear()
            out = model.gpt(idx, embeds=embeds)
            last = lengths - 1
            rows = torch.arange(idx.size(0), device=idx.device)
            hidden.append(seen[-1][rows, last].float().cpu())
            logits.append(out[rows, last].float().cpu())
            if attention and hasattr(model.gpt, "attention_to"):
                audio = idx < 0  # audio positions carry no token id (tuning.assemble)
                weights = model.gpt.attention_to(idx, last, embeds=embeds)  # (B, layers, heads, T)
                att += (weights * audio[:, None, None, :]).sum(-1).mean((1, 2)).cpu().tolist()
    finally:
        hook.remove()
    return torch.cat(hidden).numpy(), torch.cat(logits), att


def option_choice(logits: torch.Tensor, questions: Sequence[dict], tok) -> tuple[list[str], list[float]]:
    """Per question: the option whose first token (after the answer's leading space) scores highest,
    and the margin of the right option's score over the best wrong one."""
    chosen, margins = [], []
    for row, q in zip(logits, questions):
        firsts = [tok.encode(" " + o)[0] for o in q["options"]]
        scores = row[firsts]
        right = q["options"].index(q["label_answer"])
        chosen.append(q["options"][int(scores.argmax())])
        wrong = torch.cat([scores[:right], scores[right + 1 :]])
        margins.append(float(scores[right] - wrong.max()))
    return chosen, margins


def answers_by_label(questions: Sequence[dict]) -> list[dict]:
    """Open-format single-clip questions of REQUIRED_TASKS, each with its answer in words ("label_answer")."""
    out = []
    for q in questions:
        if q["task"] in REQUIRED_TASKS and q.get("options") and len(q["audios"]) == 1 and q.get("format") != "mc":
            out.append(dict(q, label_answer=q["answer"]))
    return out


@torch.no_grad()
def silence_states(encoder: str, seconds: float = 3.0) -> torch.Tensor:
    """Whisper's states (S, T, d) of `seconds` of silence, float16 as the cache keeps them: the silence control."""
    enc = WhisperEncoder.from_source(encoder)
    return enc.encode([torch.zeros(int(seconds * SAMPLE_RATE))], batch_size=1)[0].half()


def run_ladder(model: SpeechLM, cache: FeatureCache, train_questions: Sequence[dict], test_questions: Sequence[dict],
               silence: torch.Tensor | None = None, per_task: int = 150, seed: int = 0) -> Ladder:
    """The ladder of `model` on the cache's clips: probes fitted on `train_questions` (their clips and
    the LM at their answer positions), scored on `test_questions`; `silence`: Whisper's states of a
    silent clip (S, T, d) for the silence control (None: left out). per_task: questions per task and split."""
    rng = random.Random(f"{seed}:ladder")
    by_audio = clip_rows(cache)
    was = model.training
    model.eval()
    train_q = answers_by_label(train_questions)
    test_q = answers_by_label(test_questions)
    tasks = [t for t in REQUIRED_TASKS if any(q["task"] == t for q in test_q) and any(q["task"] == t for q in train_q)]
    pick = lambda qs, t: rng.sample([q for q in qs if q["task"] == t], min(per_task, sum(q["task"] == t for q in qs)))  # noqa: E731
    accuracy: dict[str, dict[str, float]] = {r: {} for r in RUNGS}
    margin: dict[str, dict[str, float]] = {"own": {}, "shuffled": {}} | ({"silence": {}} if silence is not None else {})
    answer_acc: dict[str, dict[str, float]] = {k: {} for k in margin}
    attention: dict[str, float] = {}
    n_test: dict[str, int] = {}
    voice: dict[str, float] = {}
    chance: dict[str, float] = {}
    for t in tasks:
        tr, te = pick(train_q, t), pick(test_q, t)
        n_test[t] = len(te)
        clips = sorted({Path(a).resolve() for q in tr + te for a in q["audios"]})
        states = dict(zip(clips, cache.load_states([by_audio[c] for c in clips])))
        clip_of = lambda q: Path(q["audios"][0]).resolve()  # noqa: E731
        y_tr, y_te = [q["label_answer"] for q in tr], [q["label_answer"] for q in te]
        chance[t] = 1.0 / max(1, len(set(y_te)))
        probe = lambda X_tr, X_te: balanced(y_te, fit_probe(X_tr, y_tr, seed).predict(X_te)) if len(set(y_tr)) > 1 else float("nan")  # noqa: E731
        # rungs 1-2: the clip, before the LM (and the voice tokens beside the audio tokens)
        w_tr, a_tr, v_tr = clip_features(model, [states[clip_of(q)] for q in tr])
        w_te, a_te, v_te = clip_features(model, [states[clip_of(q)] for q in te])
        accuracy["whisper"][t], accuracy["audio_tokens"][t] = probe(w_tr, w_te), probe(a_tr, a_te)
        if v_tr is not None:
            voice[t] = probe(v_tr, v_te)
        # rung 3: the LM at the answer position; rung 4: its answer
        h_tr, _, _ = answer_position(model, tr, states)
        h_te, logits, att = answer_position(model, te, states, attention=True)
        accuracy["lm_state"][t] = probe(h_tr, h_te)
        chosen, margins = option_choice(logits, te, model.tokenizer)
        accuracy["answer"][t] = answer_acc["own"][t] = balanced(y_te, chosen)
        margin["own"][t] = float(np.mean(margins))
        if att:
            attention[t] = float(np.mean(att))
        # the same questions with another clip's audio, and with silence
        order = derangement(len(te), seed)
        shuffled_states = {clip_of(q): states[clip_of(te[j])] for q, j in zip(te, order)} if len(te) > 1 else states
        controls = {"shuffled": shuffled_states} | ({"silence": {clip_of(q): silence for q in te}} if silence is not None else {})
        for name, swapped in controls.items():
            _, logits_c, _ = answer_position(model, te, swapped)
            chosen_c, margins_c = option_choice(logits_c, te, model.tokenizer)
            answer_acc[name][t], margin[name][t] = balanced(y_te, chosen_c), float(np.mean(margins_c))
    model.train(was)
    return Ladder(tasks, accuracy, margin, answer_acc, attention, n_test, voice, chance)
