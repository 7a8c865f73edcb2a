"""The texture benchmark's scorer: ask any answerer the test questions, score them per task, and run
the baselines on the very same questions.

    questions = load_questions("data/instructions/test.jsonl", max_per_task=150)  # stratified by answer
    model     = run_benchmark(questions, answer)                         # answer(rows) -> list[str]
    prior     = run_benchmark(questions, majority_answerer(train_rows))  # the training prior per task
    text_only = run_benchmark(questions, text_probe_answerer(corpus_rows, questions, transcripts))
    shuffled  = run_benchmark(shuffled_questions(questions, seed=0), answer)
    ceiling   = run_benchmark(questions, probe_answerer(cache, questions))
    fig = plot_scores({"model": model, "train majority": prior, ...})

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
- Baselines, each on the same questions:
  (1) train majority: the training set's most frequent answer per task among the question's options,
      i.e. a model that learned each task's answer prior and nothing else;
  (2) transcript only: a linear probe on character n-grams of the transcript (the corpus text, or
      Whisper's), fitted on the training clips: what the words give away, not how well the tuned
      model copes with a prompt it never saw;
  (3) shuffled audio: each distinct clip is replaced by another one through a seeded derangement
      (omni.common.derangement), so no question keeps any of its own audio; a listening model falls
      to the prior;
  (4) linear probe: logistic regression on mean-pooled Whisper states of the feature cache, fitted on
      the corpus's train clips, the state chosen on val clips; same speaker from the pair's
      |a - b| and a * b. A ceiling for what the features hold, on the same task set as the model.
  A probe answers with the option whose label value it finds most probable, so it plays by the
  question's rules; tasks without a clip label (transcription, content) get None and are left out.
"""

from __future__ import annotations

import collections
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from omni.common import derangement
from omni.data.instructions import LETTERS, TASK_LABEL, TEXTURE_TASKS, answer_value, label_answer
from omni.data.manifest import USER_ROLES, read_manifest
from omni.eval.metrics import normalize_text

MIN_QUESTIONS = 300  # the benchmark's size when the corpus is big enough; fewer gives a warning
REQUIRED_TASKS = ("gender", "accent", "rate", "pitch", "style")  # the tasks the bar names one by one (issue 20)

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
        by_answer = collections.defaultdict(list)
        for h in hits:
            by_answer[h[2]].append(h[0])
        balanced = float(np.mean([np.mean(v) for v in by_answer.values()])) if "" not in by_answer else float("nan")
        valid = [h[3] for h in hits if h[3] is not None]
        out[task] = TaskScore(task, float(c.mean()), lo, hi, float(np.mean([h[1] for h in hits])), len(c), balanced,
                              float(np.mean(valid)) if valid else float("nan"))
    if "texture" in out:
        out["texture"].balanced = float(np.nanmean([out[t].balanced for t in TEXTURE_TASKS if t in out] or [np.nan]))
    return out


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


# --- baselines ----------------------------------------------------------------------------------


def majority_answerer(train_rows: Sequence[dict]) -> Answerer:
    """Baseline (1): per task, the answer given most often in training (omni.data.instructions rows of
    the train split), among the question's options, as a letter for multiple choice; for open tasks
    the most frequent answer. What a model that learned each task's answer prior, and nothing else,
    says (ties: the alphabetically first)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in train_rows:
        if r.get("task") and r.get("task") != "multi_turn":
            counts[r["task"]][answer_value(r)] += 1

    def answer(qs: list[dict]) -> list[str | None]:
        out = []
        for q in qs:
            c = counts.get(q["task"])
            if not c:
                out.append(None)
                continue
            if not q.get("options"):
                out.append(min(c, key=lambda v: (-c[v], v)))
                continue
            best = min(q["options"], key=lambda o: (-c.get(o, 0), o))
            out.append(LETTERS[q["options"].index(best)] if q["format"] == "mc" else best)
        return out

    return answer


def transcript_questions(questions: Sequence[dict], transcripts: Mapping[str, str]) -> list[dict]:
    """Each clip replaced by its transcript (keyed by clip id): "audios" and "segments" lose the clips
    and "question" reads 'Transcript: "...". <question>' (numbered when a question has two clips).
    What a text-only LM would be asked; the transcript-only baseline itself is text_probe_answerer."""
    out = []
    for q in questions:
        missing = [c for c in q["clip_ids"] if c not in transcripts]
        if missing:
            raise ValueError(f"no transcript for clip(s) {missing[:3]} (question line {q.get('line')}, task {q['task']})")
        ts = [transcripts[c] for c in q["clip_ids"]]
        said = (f'Transcript: "{ts[0]}".' if len(ts) == 1
                else " ".join(f'Transcript {i + 1}: "{t}".' for i, t in enumerate(ts)))
        out.append(dict(q, audios=[], segments=[f"{said} {q['question']}"], question=f"{said} {q['question']}"))
    return out


def shuffled_questions(questions: Sequence[dict], seed: int = 0) -> list[dict]:
    """Baseline (3): every distinct clip swapped for another by a seeded derangement; answers unchanged."""
    clips = sorted({a for q in questions for a in q["audios"]})
    perm = derangement(len(clips), seed)
    swap = {c: clips[perm[i]] for i, c in enumerate(clips)}
    return [dict(q, audios=[swap[a] for a in q["audios"]]) for q in questions]


def _probe(X_train, y_train: list, seed: int):
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # C=1 on standardised features: a mild L2 that keeps separable classes finite (as omni.eval.metrics.linear_probe)
    with threadpool_limits(limits=1):  # one BLAS thread: many small fits on a shared machine (see omni.eval.metrics)
        scaler = StandardScaler(with_mean=not sparse.issparse(X_train))  # sparse text features keep their zeros
        return make_pipeline(scaler, LogisticRegression(C=1.0, max_iter=2000, random_state=seed)).fit(X_train, y_train)


def _pooled(cache, rows: list[int], layer: int) -> np.ndarray:
    return np.stack([s[0].float().mean(0).numpy() for s in cache.load_states(rows, [layer])])


def _pairs(rows: Sequence[dict], seed: int) -> tuple[list[tuple[int, int]], list[str]]:
    """Same-speaker training pairs from clip rows (labels: voice, gender, sentence_id): per clip one
    pair with another sentence of its voice and one with another voice (of its gender where there is
    one, as the questions' hard negatives), where both exist; (pairs of row indices, "yes"/"no")."""
    rng = random.Random(f"{seed}:pairs")
    by_voice: dict[str, list[int]] = collections.defaultdict(list)
    by_gender: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(rows):
        by_voice[r["voice"]].append(i)
        by_gender[r.get("gender")].append(i)
    pairs, ys = [], []
    for i, r in enumerate(rows):
        same = [j for j in by_voice[r["voice"]] if rows[j]["sentence_id"] != r["sentence_id"]]
        other = [j for j in by_gender[r.get("gender")] if rows[j]["voice"] != r["voice"]]
        other = other or [j for j in range(len(rows)) if rows[j]["voice"] != r["voice"]]
        if same and other:
            pairs += [(i, rng.choice(same)), (i, rng.choice(other))]
            ys += ["yes", "no"]
    return pairs, ys


def _pair_features(X, pairs: Sequence[tuple[int, int]]):
    """|a - b| and a * b of each pair's rows of X (dense or sparse): symmetric in the pair."""
    from scipy import sparse

    a, b = X[[p[0] for p in pairs]], X[[p[1] for p in pairs]]
    if sparse.issparse(X):
        return sparse.hstack([abs(a - b), a.multiply(b)]).tocsr()
    return np.concatenate([np.abs(a - b), a * b], axis=1)


def _probe_answerer(views: Sequence[tuple], train: Sequence[dict], val: Sequence[dict], test_ids: Sequence[str],
                    questions: Sequence[dict], seed: int) -> Answerer:
    """The probes behind baselines (2) and (4). views: per candidate feature (a Whisper state, or the
    transcript's n-grams) (X_train, X_val or None, X_test) over the rows `train`, `val` and the clip
    ids `test_ids`; per label the view best on val is kept (ties and no val: the first)."""
    test_at = {c: i for i, c in enumerate(test_ids)}

    def pick(fits: list, scores: list[float]):
        return max(range(len(fits)), key=lambda v: (scores[v], -v))

    proba: dict[str, dict[str, dict]] = {}  # label -> clip_id -> {label value: probability}
    for label in sorted({TASK_LABEL[q["task"]] for q in questions if TASK_LABEL.get(q["task"])}):
        y_tr, y_va = [r[label] for r in train], [r[label] for r in val]
        if len(set(y_tr)) < 2:
            continue  # nothing to learn: the probe does not take these questions
        fits = [_probe(Xtr, y_tr, seed) for Xtr, _, _ in views]
        best = pick(fits, [f.score(Xva, y_va) if len(views) > 1 and Xva is not None and val else 0.0
                           for f, (_, Xva, _) in zip(fits, views)])
        clf = fits[best]
        P = clf.predict_proba(views[best][2])
        proba[label] = {c: dict(zip(clf.classes_, P[i])) for c, i in test_at.items()}
    same: dict[tuple[str, str], float] = {}
    pair_qs = [q for q in questions if q["task"] == "same_speaker"]
    if pair_qs:
        tr_pairs, tr_y = _pairs(train, seed)
        va_pairs, va_y = _pairs(val, seed) if val else ([], [])
        if len(set(tr_y)) == 2:
            fits = [_probe(_pair_features(Xtr, tr_pairs), tr_y, seed) for Xtr, _, _ in views]
            best = pick(fits, [f.score(_pair_features(Xva, va_pairs), va_y) if len(views) > 1 and len(set(va_y)) == 2 else 0.0
                               for f, (_, Xva, _) in zip(fits, views)])
            test_pairs = [(test_at[q["clip_ids"][0]], test_at[q["clip_ids"][1]]) for q in pair_qs]
            clf = fits[best]
            P = clf.predict_proba(_pair_features(views[best][2], test_pairs))[:, list(clf.classes_).index("yes")]
            same = {(q["clip_ids"][0], q["clip_ids"][1]): float(p) for q, p in zip(pair_qs, P)}

    def answer(qs: list[dict]) -> list[str | None]:
        out = []
        for q in qs:
            if q["task"] == "same_speaker":
                p = same.get(tuple(q["clip_ids"][:2]))
                out.append(None if p is None else ("yes" if p >= 0.5 else "no"))
                continue
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


def _probed_clips(questions: Sequence[dict]) -> list[str]:
    return sorted({c for q in questions if TASK_LABEL.get(q["task"]) or q["task"] == "same_speaker" for c in q["clip_ids"]})


def probe_answerer(cache, questions: Sequence[dict], layers: Sequence[int] | None = None, seed: int = 0, clips=None) -> Answerer:
    """Baseline (4): an answerer backed by one linear probe per label (TASK_LABEL), and a pair probe for
    same speaker, on mean-pooled states of a feature cache of the corpus (omni.data.features.FeatureCache,
    rows labelled with clip_id, split, voice, ...). Fits on split "train"; with several `layers`
    (default: all states) picks per label the one best on "val".
    clips: the cache holding the questions' clips when it is another one (a separate test corpus)."""
    layers = list(range(cache.n_states)) if layers is None else list(layers)
    clips = clips or cache
    by_clip = {r["labels"].get("clip_id"): i for i, r in enumerate(clips.rows)}
    train, val = cache.select(split="train"), cache.select(split="val")
    if not train:
        raise ValueError(f"{cache.path}: no rows with split 'train' to fit a probe on")
    needed = _probed_clips(questions)
    missing = [c for c in needed if c not in by_clip]
    if missing:
        raise ValueError(f"{clips.path}: {len(missing)} question clip(s) not in the feature cache, e.g. {missing[0]}")
    if clips.n_states != cache.n_states or clips.d_model != cache.d_model:
        raise ValueError(f"{clips.path}: states ({clips.n_states} x {clips.d_model}) differ from {cache.path}'s "
                         f"({cache.n_states} x {cache.d_model}): not the same encoder")
    test_rows = [by_clip[c] for c in needed]
    views = [(_pooled(cache, train, layer), _pooled(cache, val, layer) if val else None, _pooled(clips, test_rows, layer))
             for layer in layers]
    labels = lambda rows: [cache.rows[i]["labels"] for i in rows]
    return _probe_answerer(views, labels(train), labels(val), needed, questions, seed)


def text_probe_answerer(corpus_rows: Sequence[dict], questions: Sequence[dict], transcripts: Mapping[str, str],
                        seed: int = 0) -> Answerer:
    """Baseline (2), transcript only: the probes of baseline (4) on the transcript instead of the audio
    (TF-IDF of character 2-4-grams within words), fitted on the corpus's train clips and their text.
    corpus_rows: clip rows with labels, "split" and "text" (a feature cache's rows' labels + text);
    transcripts: clip id -> the text the questions' clips are read as (the reference, or Whisper's)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    train = [r for r in corpus_rows if r["split"] == "train"]
    if not train:
        raise ValueError("no corpus rows with split 'train' to fit the transcript probe on")
    needed = _probed_clips(questions)
    missing = [c for c in needed if c not in transcripts]
    if missing:
        raise ValueError(f"no transcript for clip(s) {missing[:3]}")
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True).fit([r["text"] for r in train])
    view = (vec.transform([r["text"] for r in train]), None, vec.transform([transcripts[c] for c in needed]))
    return _probe_answerer([view], train, [], needed, questions, seed)


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
    """Issue 20's required line: on each of REQUIRED_TASKS the model's accuracy is at least `listen`
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
