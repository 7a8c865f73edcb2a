"""The texture benchmark's baselines: answerers that play by the questions' rules without the tuned
model, each asked the very same questions and scored by omni.eval.texture.

Each on the same questions:
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
import random
from typing import Mapping, Sequence

import numpy as np

from omni.common import derangement
from omni.data.instructions import LETTERS, TASK_LABEL, answer_value, label_answer
from omni.eval.texture import Answerer


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


def fit_probe(X_train, y_train: list, seed: int):
    """A linear probe: logistic regression (C=1) on standardised features, fitted."""
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
        fits = [fit_probe(Xtr, y_tr, seed) for Xtr, _, _ in views]
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
            fits = [fit_probe(_pair_features(Xtr, tr_pairs), tr_y, seed) for Xtr, _, _ in views]
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
