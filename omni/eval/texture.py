"""The texture benchmark's scorer: ask any answerer the test questions, score them per task, and run
the three baselines on the very same questions.

    questions = load_questions("data/instructions/test.jsonl")
    model     = run_benchmark(questions, answer)                         # answer(rows) -> list[str]
    text_only = run_benchmark(transcript_questions(questions, whisper_text), text_answer)
    shuffled  = run_benchmark(shuffled_questions(questions, seed=0), answer)
    ceiling   = run_benchmark(questions, probe_answerer(cache, questions))
    fig = plot_scores({"model": model, "transcript only": text_only, "shuffled audio": shuffled, "probe": ceiling})

Design choices:
- Model-agnostic: an answerer is any callable from question rows (dicts with "question", "audios",
  "options", ...) to answer strings, so the trained SpeechLM, a text-only LM and the probe are scored
  by one function. Rows come from omni.data.instructions' manifests and keep every key.
- Scoring is exact match after normalisation (omni.eval.metrics.normalize_text: case, punctuation,
  spaces). A multiple-choice answer counts if it is the right letter, the right option's text, or
  both ("B) male"); nothing else, so a long ramble never scores by containing the answer.
- Per task: accuracy, its chance rate (the mean of the rows' own `chance`: 1/options), n, and a
  percentile bootstrap 95% CI over the task's questions (numpy, seeded).
- Baseline (1), transcript only: the audio tags are replaced by a transcript per clip (e.g. Whisper's),
  so a text LM answers from the words alone: what a texture task gives away through the text.
- Baseline (2), shuffled audio: each distinct clip is replaced by another one through a seeded
  derangement (omni.common.derangement) of the clips, so no question keeps any of its own audio;
  a model that really listens falls to chance.
- Baseline (3), linear-probe ceiling: per label, scikit-learn logistic regression on mean-pooled
  Whisper states from the feature cache, fitted on the corpus's train clips; the state is chosen on
  val clips when there are several to try. A question is answered with the option whose label value
  the probe finds most probable, so the probe plays by the question's rules (its options).
  Tasks without a clip label (transcription, same speaker, content) get no probe answer (None)
  and are left out of that baseline's scores.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from omni.common import derangement
from omni.data.instructions import LETTERS, TASK_LABEL, TEXTURE_TASKS, label_answer
from omni.data.manifest import USER_ROLES, read_manifest
from omni.eval.metrics import normalize_text

MIN_QUESTIONS = 300  # the benchmark's size when the corpus is big enough; fewer gives a warning

Answerer = Callable[[list[dict]], list]


@dataclass
class TaskScore:
    task: str
    accuracy: float
    lo: float  # bootstrap 95% CI
    hi: float
    chance: float  # mean of the questions' chance rates (1 / options; 0 for open answers)
    n: int  # questions scored


def load_questions(path: str | Path, check_audio: bool = True, max_per_task: int | None = None, seed: int = 0) -> list[dict]:
    """Rows of an instruction manifest as question dicts: the manifest's keys plus "question" (the user
    text without tags) and "audios" (resolved clip paths, in tag order). max_per_task: a seeded
    subsample per task, in manifest order."""
    m = read_manifest(path, check_audio=check_audio)
    rows = []
    for e in m:
        if e.turns is None or "task" not in e.labels or "answer" not in e.labels:
            raise ValueError(f"{path}:{e.line}: not an instruction row (needs conversations, task, answer)")
        user = [t for t in e.turns if t.role in USER_ROLES][-1]
        rows.append(dict(e.labels, question=user.text, audios=[str(p) for p in e.audios], line=e.line))
    if max_per_task is not None:
        rng = np.random.default_rng(seed)
        keep = set()
        for task in sorted({r["task"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["task"] == task]
            keep |= set(rng.permutation(idx)[:max_per_task].tolist()) if len(idx) > max_per_task else set(idx)
        rows = [r for i, r in enumerate(rows) if i in keep]
    if len(rows) < MIN_QUESTIONS:
        warnings.warn(f"{path}: {len(rows)} questions, fewer than the benchmark's {MIN_QUESTIONS} (a small corpus?)", stacklevel=2)
    return rows


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


def bootstrap_ci(correct: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean of 0/1 outcomes."""
    if len(correct) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(n_boot, len(correct)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def score(questions: Sequence[dict], predictions: Sequence[str | None], seed: int = 0, n_boot: int = 1000) -> dict[str, TaskScore]:
    """Per-task scores plus "texture" (all texture tasks' questions pooled); a None prediction means
    the answerer does not take that question, which is then left out (not counted wrong)."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    groups: dict[str, list[tuple[bool, float]]] = {}
    for q, p in zip(questions, predictions):
        if p is None:
            continue
        hit = (is_correct(p, q), float(q["chance"]))
        groups.setdefault(q["task"], []).append(hit)
        if q["task"] in TEXTURE_TASKS:
            groups.setdefault("texture", []).append(hit)
    out = {}
    for i, (task, hits) in enumerate(sorted(groups.items())):
        c = np.array([h for h, _ in hits], dtype=np.float64)
        lo, hi = bootstrap_ci(c, n_boot, seed + i)
        out[task] = TaskScore(task, float(c.mean()), lo, hi, float(np.mean([ch for _, ch in hits])), len(c))
    return out


def ask(questions: Sequence[dict], answer: Answerer, batch_size: int = 64) -> list:
    """`answer`'s predictions for every question, in order, asked in batches of one task at a time
    (an answerer may then size its decoding budget to the task: transcripts are long, labels short)."""
    order = sorted(range(len(questions)), key=lambda i: (questions[i]["task"], i))
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


def run_benchmark(questions: Sequence[dict], answer: Answerer, batch_size: int = 64, seed: int = 0) -> dict[str, TaskScore]:
    """Ask `answer` every question (in batches) and score the answers."""
    return score(questions, ask(questions, answer, batch_size), seed=seed)


# --- baselines ----------------------------------------------------------------------------------


def transcript_questions(questions: Sequence[dict], transcripts: Mapping[str, str]) -> list[dict]:
    """Baseline (1): each clip replaced by its transcript (keyed by clip id); "audios" becomes empty and
    "question" reads 'Transcript: "...". <question>' (numbered when a question has two clips)."""
    out = []
    for q in questions:
        missing = [c for c in q["clip_ids"] if c not in transcripts]
        if missing:
            raise ValueError(f"no transcript for clip(s) {missing[:3]} (question line {q.get('line')}, task {q['task']})")
        ts = [transcripts[c] for c in q["clip_ids"]]
        said = (f'Transcript: "{ts[0]}".' if len(ts) == 1
                else " ".join(f'Transcript {i + 1}: "{t}".' for i, t in enumerate(ts)))
        out.append(dict(q, audios=[], question=f"{said} {q['question']}"))
    return out


def shuffled_questions(questions: Sequence[dict], seed: int = 0) -> list[dict]:
    """Baseline (2): every distinct clip swapped for another by a seeded derangement; answers unchanged."""
    clips = sorted({a for q in questions for a in q["audios"]})
    perm = derangement(len(clips), seed)
    swap = {c: clips[perm[i]] for i, c in enumerate(clips)}
    return [dict(q, audios=[swap[a] for a in q["audios"]]) for q in questions]


def _probe(X_train: np.ndarray, y_train: list, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # C=1 on standardised features: a mild L2 that keeps separable classes finite (as omni.eval.metrics.linear_probe)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # one BLAS thread: many small fits on a shared machine (see omni.eval.metrics)
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed)).fit(X_train, y_train)


def _pooled(cache, rows: list[int], layer: int) -> np.ndarray:
    return np.stack([s[0].float().mean(0).numpy() for s in cache.load_states(rows, [layer])])


def probe_answerer(cache, questions: Sequence[dict], layers: Sequence[int] | None = None, seed: int = 0, clips=None) -> Answerer:
    """Baseline (3): an answerer backed by one linear probe per label (TASK_LABEL) on a feature cache
    of the corpus (omni.data.features.FeatureCache, rows labelled with clip_id and split). Fits on
    split "train"; with several `layers` (default: all states) picks per label the one best on "val".
    clips: the cache holding the questions' clips when it is another one (a separate test corpus)."""
    layers = list(range(cache.n_states)) if layers is None else list(layers)
    clips = clips or cache
    by_clip = {r["labels"].get("clip_id"): i for i, r in enumerate(clips.rows)}
    train, val = cache.select(split="train"), cache.select(split="val")
    if not train:
        raise ValueError(f"{cache.path}: no rows with split 'train' to fit a probe on")
    needed = sorted({q["clip_ids"][0] for q in questions if TASK_LABEL.get(q["task"])})
    missing = [c for c in needed if c not in by_clip]
    if missing:
        raise ValueError(f"{clips.path}: {len(missing)} question clip(s) not in the feature cache, e.g. {missing[0]}")
    if clips.n_states != cache.n_states or clips.d_model != cache.d_model:
        raise ValueError(f"{clips.path}: states ({clips.n_states} x {clips.d_model}) differ from {cache.path}'s "
                         f"({cache.n_states} x {cache.d_model}): not the same encoder")
    test_rows = [by_clip[c] for c in needed]
    X = {layer: (_pooled(cache, train, layer), _pooled(cache, val, layer) if val else None, _pooled(clips, test_rows, layer))
         for layer in layers}
    proba: dict[str, dict[str, dict]] = {}  # label -> clip_id -> {label value: probability}
    for label in sorted({TASK_LABEL[q["task"]] for q in questions if TASK_LABEL.get(q["task"])}):
        y_tr = [cache.rows[i]["labels"][label] for i in train]
        y_va = [cache.rows[i]["labels"][label] for i in val]
        if len(set(y_tr)) < 2:
            continue  # nothing to learn: the probe does not take these questions
        fits = {layer: _probe(X[layer][0], y_tr, seed) for layer in layers}
        # the state that is best on val (ties and no val: the earliest listed)
        best = max(layers, key=lambda layer: (fits[layer].score(X[layer][1], y_va) if len(layers) > 1 and val else 0.0, -layers.index(layer)))
        clf = fits[best]
        P = clf.predict_proba(X[best][2])
        proba[label] = {c: dict(zip(clf.classes_, p)) for c, p in zip(needed, P)}

    def answer(qs: list[dict]) -> list[str | None]:
        out = []
        for q in qs:
            label = TASK_LABEL.get(q["task"])
            if not label or label not in proba:
                out.append(None)
                continue
            p = proba[label][q["clip_ids"][0]]
            # each option's probability: the summed probability of the label values that give it
            weight = {o: sum(v for value, v in p.items() if label_answer(q["task"], value) == o) for o in q["options"]}
            best = max(q["options"], key=lambda o: weight[o])
            out.append(LETTERS[q["options"].index(best)] if q["format"] == "mc" else best)
        return out

    return answer


# --- the summary: a table, headline numbers and sentences from them ----------------------------

MODEL, TEXT, SHUFFLED, PROBE = "model", "transcript only", "shuffled audio", "linear probe"


def _get(results: Mapping[str, Mapping[str, TaskScore]], name: str) -> Mapping[str, TaskScore]:
    """An answerer's scores by name or name prefix ("transcript only" finds "transcript only (reference)")."""
    for k, v in results.items():
        if k == name or k.startswith(name):
            return v
    return {}


def task_table(results: Mapping[str, Mapping[str, TaskScore]]) -> list[dict]:
    """One row per task (texture tasks first, then the pooled "texture", then the rest): the model's
    accuracy with its 95% CI, chance, and each baseline's accuracy (nan where it does not answer)."""
    model = _get(results, MODEL)
    order = [t for t in TEXTURE_TASKS if t in model] + [t for t in ("texture",) if t in model]
    order += sorted(t for t in model if t not in order)
    def acc(name: str, t: str) -> float:
        got = _get(results, name)
        return got[t].accuracy if t in got else float("nan")

    return [{"task": t, "n": model[t].n, "accuracy": model[t].accuracy, "ci_lo": model[t].lo, "ci_hi": model[t].hi,
             "chance": model[t].chance, "transcript_only": acc(TEXT, t), "shuffled": acc(SHUFFLED, t), "probe": acc(PROBE, t)}
            for t in order]


def headline(results: Mapping[str, Mapping[str, TaskScore]], prefix: str = "") -> dict[str, float]:
    """Flat numbers for an index: the macro means over the texture tasks the model was asked
    (model, chance, each baseline), the margin over chance, how many texture tasks beat the
    transcript-only baseline, and every task's accuracy."""
    model = _get(results, MODEL)
    tasks = [t for t in TEXTURE_TASKS if t in model]
    if not tasks:
        return {}

    def mean(name: str, attr: str = "accuracy") -> float:
        got = _get(results, name)
        vals = [getattr(got[t], attr) for t in tasks if t in got]
        return float(np.mean(vals)) if vals else float("nan")

    text = _get(results, TEXT)
    out = {"texture_mean": mean(MODEL), "texture_chance_mean": mean(MODEL, "chance"),
           "transcript_only_texture_mean": mean(TEXT), "shuffled_texture_mean": mean(SHUFFLED), "probe_texture_mean": mean(PROBE),
           "texture_tasks": float(len(tasks)),
           "texture_tasks_above_transcript_only": float(sum(model[t].accuracy > text[t].accuracy for t in tasks if t in text))}
    out["texture_over_chance"] = out["texture_mean"] - out["texture_chance_mean"]
    out |= {f"acc_{t}": s.accuracy for t, s in model.items()}
    return {f"{prefix}{k}": v for k, v in out.items()}


def meets_bar(results: Mapping[str, Mapping[str, TaskScore]], margin: float = 0.25) -> tuple[bool, str]:
    """The texture bar: mean texture accuracy >= mean chance + margin AND above transcript-only on
    every texture task; (passed, one line saying why)."""
    h = headline(results)
    if not h:
        return False, "no texture task was asked"
    text, model = _get(results, TEXT), _get(results, MODEL)
    behind = [t for t in TEXTURE_TASKS if t in model and t in text and model[t].accuracy <= text[t].accuracy]
    ok_mean = h["texture_mean"] >= h["texture_chance_mean"] + margin
    why = (f"mean texture accuracy {h['texture_mean']:.3f} vs chance {h['texture_chance_mean']:.3f} + {margin:.2f} "
           f"({'met' if ok_mean else 'NOT met'}); " + (f"not above transcript-only on {', '.join(behind)}" if behind
                                                       else "above transcript-only on every texture task"))
    return ok_mean and not behind, why


def findings(results: Mapping[str, Mapping[str, TaskScore]], where: str = "") -> list[str]:
    """One sentence per texture task saying whether the model hears it, each with its numbers. It
    "hears" a texture when its CI lies above chance and it beats both the transcript-only and the
    shuffled-audio answers; "partly" when only its accuracy (not the CI) is above them."""
    model, text, shuf, probe = (_get(results, n) for n in (MODEL, TEXT, SHUFFLED, PROBE))
    out = []
    for t in [t for t in TEXTURE_TASKS if t in model]:
        m = model[t]
        others = [x[t].accuracy for x in (text, shuf) if t in x]
        best_other = max(others) if others else m.chance
        if m.lo > max(m.chance, best_other):
            verdict = "hears"
        elif m.accuracy > max(m.chance, best_other):
            verdict = "partly hears"
        else:
            verdict = "does not hear"
        bits = [f"chance {m.chance:.2f}"]
        bits += [f"{name} {x[t].accuracy:.2f}" for name, x in (("transcript-only", text), ("shuffled audio", shuf), ("probe", probe)) if t in x]
        out.append(f"{where}{verdict} {t}: {m.accuracy:.2f} [{m.lo:.2f}, {m.hi:.2f}] (n={m.n}) vs {', '.join(bits)}.")
    return out


# --- the figure ---------------------------------------------------------------------------------


def plot_scores(results: Mapping[str, Mapping[str, TaskScore]], title: str = ""):
    """Grouped bars per task (one colour per answerer) with 95% CI whiskers and each task's chance as
    a black tick; returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in results.values() for t in r}, key=lambda t: (t == "texture", t))
    names = list(results)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, len(tasks) * (0.4 + 0.2 * len(names))), 3.6))
    x = np.arange(len(tasks))
    for j, name in enumerate(names):
        s = [results[name].get(t) for t in tasks]
        acc = np.array([v.accuracy if v else np.nan for v in s])
        err = np.array([[v.accuracy - v.lo, v.hi - v.accuracy] if v else [np.nan, np.nan] for v in s]).T
        ax.bar(x - 0.4 + width * (j + 0.5), acc, width, yerr=err, capsize=2, label=name)
    chance = [next((r[t].chance for r in results.values() if t in r), np.nan) for t in tasks]
    ax.hlines(chance, x - 0.45, x + 0.45, colors="black", linewidth=1.5, label="chance")
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach 1.0
    fig.tight_layout()
    return fig
