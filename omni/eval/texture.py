"""The texture benchmark's scorer: ask any answerer the test questions, score them per task, and run
the baselines on the very same questions.

    questions = load_questions("data/instructions/test.jsonl", max_per_task=150)  # stratified by answer
    model     = run_benchmark(questions, answer)                         # answer(rows) -> list[str]
    prior     = run_benchmark(questions, majority_answerer(train_rows))  # the training prior per task
    text_only = run_benchmark(questions, text_probe_answerer(corpus_rows, questions, transcripts))
    shuffled  = run_benchmark(shuffled_questions(questions, seed=0), answer)
    ceiling   = run_benchmark(questions, probe_answerer(cache, questions))   # baselines: omni.eval.texture_baselines
    fig = plots.texture_scores({"model": model, "train majority": prior, ...})   # omni.experiments.plots

Design choices:
- Model-agnostic: an answerer is any callable from question rows (dicts with "question", "audios",
  "segments", "options", ...) to answer strings, so the trained SpeechLM, the probes and the
  baselines are scored by one function. Rows come from omni.data.instructions' manifests and keep
  every key; "segments" keeps the user turn's text and clips in the order written (an int is an index
  into "audios"), so a question written audio-last is asked audio-last.
- Scoring is exact match after normalisation (omni.eval.metrics.normalize_text: case, punctuation,
  spaces). A multiple-choice answer counts if it is the right letter, the right option's text, or
  both ("B) male"); nothing else, so a long ramble never scores by containing the answer.
- Per task: accuracy with a percentile bootstrap 95% CI (numpy, seeded); chance (the mean of the rows'
  own `chance`: 1/options); balanced accuracy (the mean over answers of the accuracy on the questions
  with that answer: what a held-out set whose answers are not balanced does not give away); and the
  share of valid answers (one of the question's options, its letter, yes/no), so an answerer that
  always answers in the right form (a probe) and one that does not (an LM) are compared knowingly.
- The benchmark's sample is stratified by answer (`max_per_task`: up to max_per_task / answers of each
  answer, seeded): a constant answer then scores chance whatever the seed, and the held-out voices'
  label mix (two of three held-out variants are female) cannot lift or sink a prior.
- The baselines (train majority, transcript only, shuffled audio, linear probe) live in
  omni.eval.texture_baselines; each is an answerer scored here like the model.
"""

from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from omni.data.instructions import LETTERS, TEXTURE_TASKS, answer_value
from omni.data.manifest import USER_ROLES, read_manifest
from omni.eval.metrics import normalize_text

MIN_QUESTIONS = 300  # the benchmark's size when the corpus is big enough; fewer gives a warning
REQUIRED_TASKS = ("gender", "accent", "rate", "pitch", "style")  # the tasks the bar names one by one

Answerer = Callable[[list[dict]], list]


@dataclass
class TaskScore:
    task: str
    accuracy: float
    lo: float  # bootstrap 95% CI
    hi: float
    chance: float  # mean of the questions' chance rates (1 / options; 0 for open answers)
    n: int  # questions scored
    balanced: float = float("nan")  # mean over answers of the accuracy on that answer's questions; nan for open answers
    valid: float = float("nan")  # share of answers that are a valid option (or its letter); nan for open answers


def load_questions(path: str | Path, check_audio: bool = True, max_per_task: int | None = None, seed: int = 0,
                   exclude_clips: Sequence[str] = (), tasks: Sequence[str] | None = None) -> list[dict]:
    """Rows of an instruction manifest as question dicts: the manifest's keys plus "question" (the user
    text without tags), "audios" (resolved clip paths, in tag order) and "segments" (the user turn in
    order: text, and an int for audios[i] where that clip stands).

    max_per_task: a seeded sample per task, stratified by answer (up to ceil(max_per_task / answers) of
    each answer; tasks without a closed answer set: a plain sample), in manifest order.
    exclude_clips: clip ids whose questions are left out (the ones watched during training).
    tasks: only these tasks' questions (None: all)."""
    m = read_manifest(path, check_audio=check_audio)
    skip = set(exclude_clips)
    rows = []
    for e in m:
        if e.turns is None or "task" not in e.labels or "answer" not in e.labels:
            raise ValueError(f"{path}:{e.line}: not an instruction row (needs conversations, task, answer)")
        if skip.intersection(e.labels.get("clip_ids", ())) or (tasks is not None and e.labels["task"] not in tasks):
            continue
        user = [t for t in e.turns if t.role in USER_ROLES][-1]
        audios = [str(p) for p in user.audio]
        order = [audios.index(str(s)) if isinstance(s, Path) else s for s in user.segments]
        rows.append(dict(e.labels, question=user.text, audios=audios, segments=order, line=e.line))
    if max_per_task is not None:
        rows = stratified(rows, max_per_task, seed)
    if len(rows) < MIN_QUESTIONS:
        warnings.warn(f"{path}: {len(rows)} questions, fewer than the benchmark's {MIN_QUESTIONS} (a small corpus?)", stacklevel=2)
    return rows


def stratified(rows: Sequence[dict], per_task: int, seed: int = 0) -> list[dict]:
    """Up to `per_task` rows per task, an equal share of each answer where the data allow (seeded),
    in the input order. Open tasks (no options: transcripts, last words) are sampled plainly."""
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    for task in sorted({r["task"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        if not rows[idx[0]].get("options"):
            keep |= set(rng.permutation(idx)[:per_task].tolist())
            continue
        by: dict[str, list[int]] = collections.defaultdict(list)
        for i in idx:
            by[answer_value(rows[i])].append(i)
        quota = math.ceil(per_task / len(by))
        for value in sorted(by):
            keep |= set(rng.permutation(by[value])[:quota].tolist())
    return [r for i, r in enumerate(rows) if i in keep]


def is_correct(prediction: str | None, q: dict) -> bool:
    """Exact match after normalisation; multiple choice also takes the option text or 'letter text'."""
    if prediction is None:
        return False
    p, a = normalize_text(prediction), normalize_text(q["answer"])
    if p == a:
        return True
    if q.get("format") == "mc":
        text = normalize_text(q["options"][LETTERS.index(q["answer"])])
        return p in (text, f"{a} {text}")
    return False


def is_valid(prediction: str | None, q: dict) -> bool | None:
    """Whether an answer is one a question allows (an option; for multiple choice also its letter or
    'letter text'); None for open questions, which have no closed set."""
    if not q.get("options"):
        return None
    if prediction is None:
        return False
    p = normalize_text(prediction)
    texts = [normalize_text(o) for o in q["options"]]
    if q.get("format") == "mc":
        letters = [normalize_text(LETTERS[i]) for i in range(len(texts))]
        return p in texts or p in letters or p in {f"{a} {t}" for a, t in zip(letters, texts)}
    return p in texts


def bootstrap_ci(correct: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean of 0/1 outcomes."""
    if len(correct) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(n_boot, len(correct)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def balanced_accuracy(hits: Iterable[tuple[bool, str]]) -> float:
    """Mean over answers of the accuracy on that answer's questions; hits: (correct, answer value);
    nan when there are none."""
    by_answer: dict[str, list[bool]] = collections.defaultdict(list)
    for hit, value in hits:
        by_answer[value].append(hit)
    return float(np.mean([np.mean(v) for v in by_answer.values()])) if by_answer else float("nan")


def score(questions: Sequence[dict], predictions: Sequence[str | None], seed: int = 0, n_boot: int = 1000) -> dict[str, TaskScore]:
    """Per-task scores plus "texture" (all texture tasks' questions pooled; its balanced accuracy is
    the mean of the tasks'); a None prediction means the answerer does not take that question, which
    is then left out (not counted wrong)."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    groups: dict[str, list[tuple[bool, float, str, bool | None]]] = {}
    for q, p in zip(questions, predictions):
        if p is None:
            continue
        hit = (is_correct(p, q), float(q["chance"]), answer_value(q) if q.get("options") else "", is_valid(p, q))
        groups.setdefault(q["task"], []).append(hit)
        if q["task"] in TEXTURE_TASKS:
            groups.setdefault("texture", []).append(hit)
    out = {}
    for i, (task, hits) in enumerate(sorted(groups.items())):
        c = np.array([h[0] for h in hits], dtype=np.float64)
        lo, hi = bootstrap_ci(c, n_boot, seed + i)
        balanced = balanced_accuracy((h[0], h[2]) for h in hits) if all(h[2] != "" for h in hits) else float("nan")
        valid = [h[3] for h in hits if h[3] is not None]
        out[task] = TaskScore(task, float(c.mean()), lo, hi, float(np.mean([h[1] for h in hits])), len(c), balanced,
                              float(np.mean(valid)) if valid else float("nan"))
    if "texture" in out:
        out["texture"].balanced = float(np.nanmean([out[t].balanced for t in TEXTURE_TASKS if t in out] or [np.nan]))
    return out


def by_format(questions: Sequence[dict], predictions: Sequence[str | None]) -> list[dict]:
    """Per texture task and question format ("open": the answer in words; "mc": lettered options,
    answered with a letter): questions, balanced accuracy, and the share of the answer given most
    often. Choosing the right value and binding it to its letter are two steps (arXiv 2210.12353
    calls the second "multiple choice symbol binding"; arXiv 2601.03914 finds them in two stages);
    a model that hears but cannot bind answers open questions well and every lettered one with the
    same letter (share near 1), which the per-task score averages into one middling number."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    groups: dict[tuple[str, str], list[tuple[bool, str, str]]] = collections.defaultdict(list)
    for q, p in zip(questions, predictions):
        if p is not None and q["task"] in TEXTURE_TASKS and q.get("options"):
            groups[(q["task"], q.get("format", "open"))].append((is_correct(p, q), answer_value(q), normalize_text(p)))
    order = {t: i for i, t in enumerate(TEXTURE_TASKS)}
    rows = []
    for (task, fmt), hits in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] != "open")):
        most = collections.Counter(h[2] for h in hits).most_common(1)[0]
        rows.append({"task": task, "format": fmt, "n": len(hits), "balanced": balanced_accuracy((h[0], h[1]) for h in hits),
                     "top_answer": most[0], "top_answer_share": most[1] / len(hits)})
    return rows


def ask(questions: Sequence[dict], answer: Answerer, batch_size: int = 64, length: Callable[[dict], float] | None = None) -> list:
    """`answer`'s predictions for every question, in order, asked in batches of one task at a time
    (an answerer may then size its decoding budget to the task: transcripts are long, labels short).
    length: a question's size (e.g. its audio frames); questions of a task are then batched by size,
    so a batch padded to its longest question wastes little."""
    order = sorted(range(len(questions)), key=lambda i: (questions[i]["task"], length(questions[i]) if length else 0, i))
    predictions: list = [None] * len(questions)
    start = 0
    while start < len(order):
        task = questions[order[start]]["task"]
        end = start
        while end < len(order) and end - start < batch_size and questions[order[end]]["task"] == task:
            end += 1
        batch = [questions[i] for i in order[start:end]]
        got = list(answer(batch))
        if len(got) != len(batch):
            raise ValueError(f"the answerer returned {len(got)} answers for {len(batch)} questions")
        for i, p in zip(order[start:end], got):
            predictions[i] = p
        start = end
    return predictions


def run_benchmark(questions: Sequence[dict], answer: Answerer, batch_size: int = 64, seed: int = 0,
                  length: Callable[[dict], float] | None = None) -> dict[str, TaskScore]:
    """Ask `answer` every question (in batches, by size when `length` is given) and score the answers."""
    return score(questions, ask(questions, answer, batch_size, length), seed=seed)


# --- the summary: a table, headline numbers and sentences from them ----------------------------

MODEL, MAJORITY, TEXT, SHUFFLED, PROBE = "model", "train majority", "transcript only", "shuffled audio", "linear probe"


def _get(results: Mapping[str, Mapping[str, TaskScore]], name: str) -> Mapping[str, TaskScore]:
    """An answerer's scores by name or name prefix ("transcript only" finds "transcript only (reference)")."""
    for k, v in results.items():
        if k == name or k.startswith(name):
            return v
    return {}


def _acc(results: Mapping[str, Mapping[str, TaskScore]], name: str, t: str) -> float:
    got = _get(results, name)
    return got[t].accuracy if t in got else float("nan")


def floor(results: Mapping[str, Mapping[str, TaskScore]], t: str) -> float:
    """What a task gives without listening: max(chance, the train-majority answer's accuracy)."""
    m = _get(results, MODEL)[t]
    major = _acc(results, MAJORITY, t)
    return max(m.chance, major) if major == major else m.chance


def task_table(results: Mapping[str, Mapping[str, TaskScore]]) -> list[dict]:
    """One row per task (texture tasks first, then the pooled "texture", then the rest): the model's
    accuracy with its 95% CI, balanced accuracy and valid-answer share, chance, and each baseline's
    accuracy (nan where it does not answer)."""
    model = _get(results, MODEL)
    order = [t for t in TEXTURE_TASKS if t in model] + [t for t in ("texture",) if t in model]
    order += sorted(t for t in model if t not in order)
    return [{"task": t, "n": model[t].n, "accuracy": model[t].accuracy, "ci_lo": model[t].lo, "ci_hi": model[t].hi,
             "balanced": model[t].balanced, "valid": model[t].valid, "chance": model[t].chance,
             "train_majority": _acc(results, MAJORITY, t), "transcript_only": _acc(results, TEXT, t),
             "shuffled": _acc(results, SHUFFLED, t), "probe": _acc(results, PROBE, t)}
            for t in order]


def headline(results: Mapping[str, Mapping[str, TaskScore]], prefix: str = "") -> dict[str, float]:
    """Flat numbers for an index: the macro means over the texture tasks the model was asked (model,
    its balanced accuracy and valid share, chance, each baseline, the floor max(chance, train majority)),
    the margin over the floor, how many texture tasks beat the transcript-only baseline, and every
    task's accuracy, balanced accuracy and valid share."""
    model = _get(results, MODEL)
    tasks = [t for t in TEXTURE_TASKS if t in model]
    if not tasks:
        return {}

    def mean(name: str, attr: str = "accuracy") -> float:
        got = _get(results, name)
        vals = [getattr(got[t], attr) for t in tasks if t in got]
        return float(np.nanmean(vals)) if vals and not all(v != v for v in vals) else float("nan")

    text = _get(results, TEXT)
    out = {"texture_mean": mean(MODEL), "texture_balanced_mean": mean(MODEL, "balanced"), "texture_valid_mean": mean(MODEL, "valid"),
           "texture_chance_mean": mean(MODEL, "chance"), "train_majority_texture_mean": mean(MAJORITY),
           "texture_floor_mean": float(np.mean([floor(results, t) for t in tasks])),
           "transcript_only_texture_mean": mean(TEXT), "shuffled_texture_mean": mean(SHUFFLED), "probe_texture_mean": mean(PROBE),
           "texture_tasks": float(len(tasks)),
           "texture_tasks_above_transcript_only": float(sum(model[t].accuracy > text[t].accuracy for t in tasks if t in text))}
    out["texture_over_chance"] = out["texture_mean"] - out["texture_chance_mean"]
    out["texture_over_floor"] = out["texture_mean"] - out["texture_floor_mean"]
    out |= {f"acc_{t}": s.accuracy for t, s in model.items()}
    out |= {f"bal_{t}": s.balanced for t, s in model.items() if s.balanced == s.balanced}
    out |= {f"valid_{t}": s.valid for t, s in model.items() if s.valid == s.valid}
    return {f"{prefix}{k}": v for k, v in out.items()}


def meets_bar(results: Mapping[str, Mapping[str, TaskScore]], margin: float = 0.25, listen: float = 0.10) -> tuple[bool, str]:
    """The texture bar: on each of REQUIRED_TASKS the model's accuracy is at least `listen`
    above shuffled audio and above both train majority and transcript-only, AND the mean over the
    texture tasks is at least `margin` above the mean floor max(chance, train majority);
    (passed, one line saying why)."""
    h = headline(results)
    if not h:
        return False, "no texture task was asked"
    model = _get(results, MODEL)
    short = []
    for t in REQUIRED_TASKS:
        if t not in model:
            short.append(f"{t} not asked")
            continue
        a = model[t].accuracy
        behind = [f"{name} {need:.2f}" + (f" + {gap:.2f}" if gap else "")
                  for name, gap in ((SHUFFLED, listen), (MAJORITY, 0.0), (TEXT, 0.0))
                  if (need := _acc(results, name, t)) == need and not (a >= need + gap if gap else a > need)]
        if behind:
            short.append(f"{t} {a:.2f} vs {', '.join(behind)}")
    ok_mean = h["texture_mean"] >= h["texture_floor_mean"] + margin
    why = (f"mean texture accuracy {h['texture_mean']:.3f} vs floor max(chance, train majority) {h['texture_floor_mean']:.3f} "
           f"+ {margin:.2f} ({'met' if ok_mean else 'NOT met'}); "
           + (f"short on: {'; '.join(short)}" if short
              else f"each of {', '.join(REQUIRED_TASKS)} {listen:.2f} above shuffled audio and above train majority and transcript-only"))
    return ok_mean and not short, why


def findings(results: Mapping[str, Mapping[str, TaskScore]], where: str = "") -> list[str]:
    """One sentence per texture task saying whether the model hears it, each with its numbers. It
    "hears" a texture when its CI lies above the floor (max of chance and train majority) and above
    both the transcript-only and the shuffled-audio answers; "partly" when only its accuracy (not the
    CI) is above them."""
    model, major, text, shuf, probe = (_get(results, n) for n in (MODEL, MAJORITY, TEXT, SHUFFLED, PROBE))
    out = []
    for t in [t for t in TEXTURE_TASKS if t in model]:
        m = model[t]
        best_other = max([floor(results, t)] + [x[t].accuracy for x in (text, shuf) if t in x])
        if m.lo > best_other:
            verdict = "hears"
        elif m.accuracy > best_other:
            verdict = "partly hears"
        else:
            verdict = "does not hear"
        bits = [f"chance {m.chance:.2f}"]
        bits += [f"{name} {x[t].accuracy:.2f}" for name, x in (("train majority", major), ("transcript-only", text),
                                                                ("shuffled audio", shuf), ("probe", probe)) if t in x]
        extra = f"; balanced {m.balanced:.2f}, valid {m.valid:.2f}" if m.valid == m.valid else ""
        out.append(f"{where}{verdict} {t}: {m.accuracy:.2f} [{m.lo:.2f}, {m.hi:.2f}] (n={m.n}{extra}) vs {', '.join(bits)}.")
    return out


# --- the figure ---------------------------------------------------------------------------------
