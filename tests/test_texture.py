"""The benchmark scorer with toy answerers: an oracle scores 1, a constant answer scores chance, an
oracle that reads the audio falls to chance when the audio is shuffled, a transcript-only answerer
gets the text and no audio, and a probe on informative fake Whisper states beats chance."""

import collections
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from omni.eval.texture import TaskScore, ask, by_format, findings, headline, is_correct, load_questions, meets_bar, run_benchmark, score, task_table
from omni.eval.texture_baselines import majority_answerer, probe_answerer, shuffled_questions, text_probe_answerer, transcript_questions
from omni.experiments.plots import texture_scores
from omni.data.instructions import LETTERS, TASK_LABEL, TEXTURE_TASKS, InstructionConfig, build_instructions, label_answer
from omni.data.manifest import write_manifest

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029")
VARIANTS = {"f1": ("female", "normal"), "m1": ("male", "normal"), "klatt": ("other", "klatt"),
            "whisper": ("male", "whisper"), "croak": ("male", "croak"), "f4": ("female", "normal")}
WORDS = "the cat sat on a mat while dogs ran far away from home under grey skies".split()


def fake_rows(n_per_split: dict[str, int], seed: int = 0) -> list[dict]:
    """Corpus-like rows (no audio on disk): labels as omni.data.synth writes them."""
    rng = random.Random(seed)
    rows, sid = [], 0
    for split, n in n_per_split.items():
        voices = [f"{a}+{v}" for a in ACCENTS for v in VARIANTS][: max(3, n // 4)]
        for i in range(n):
            voice = voices[i % len(voices)]
            accent, variant = voice.split("+")
            gender, style = VARIANTS[variant]
            rate, pitch = rng.randint(130, 230), rng.randint(25, 75)
            text = " ".join(rng.sample(WORDS, 5)).capitalize() + "."
            rows.append({"audio": f"/nowhere/{split}_{i}.wav", "text": text, "voice": voice, "accent": accent,
                         "variant": variant, "gender": gender, "style": style, "rate": rate, "pitch": pitch,
                         "rate_bucket": ["slow", "medium", "fast"][min(2, (rate - 130) * 3 // 101)],
                         "pitch_bucket": ["low", "mid", "high"][min(2, (pitch - 25) * 3 // 51)],
                         "split": split, "sentence_id": sid, "clip_id": f"{split}_{i:04d}"})
            sid += 1
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(corpus rows, test questions as load_questions reads them back from the written manifest)."""
    rows = fake_rows({"train": 160, "val": 40, "test": 120})
    sets = build_instructions(rows, InstructionConfig(seed=1))
    path = write_manifest(tmp_path_factory.mktemp("bench") / "test.jsonl", sets["test"])
    return rows, load_questions(path, check_audio=False)


def oracle(qs):
    return [q["answer"] for q in qs]


def audio_oracle(rows):
    """Answers from the LABELS OF THE AUDIO it is given (keyed by path): perfect on the right audio."""
    by_audio = {r["audio"]: r for r in rows}

    def answer(qs):
        out = []
        for q in qs:
            r = by_audio[q["audios"][0]]
            if q["task"] == "same_speaker":
                out.append("yes" if r["voice"] == by_audio[q["audios"][1]]["voice"] else "no")
                continue
            label = TASK_LABEL.get(q["task"])
            if not label:
                out.append(q["answer"])  # content tasks: not what this test is about
                continue
            said = label_answer(q["task"], r[label])
            if q["format"] == "mc":
                out.append(LETTERS[q["options"].index(said)] if said in q["options"] else "Z")
            else:
                out.append(said or "none")
        return out

    return answer


def test_load_questions_oracle_scores_one(corpus, tmp_path):
    rows, qs = corpus
    path = write_manifest(tmp_path / "test.jsonl", build_instructions(rows, InstructionConfig(seed=1))["test"])
    assert len(qs) >= 300
    assert {len(q["audios"]) for q in qs} == {1, 2} and all("<audio>" not in q["question"] for q in qs)
    s = run_benchmark(qs, oracle, batch_size=50)
    assert all(v.accuracy == 1.0 and v.lo == 1.0 for v in s.values())
    assert s["texture"].n == sum(1 for q in qs if q["task"] not in ("transcribe", "last_word", "mention", "describe"))
    small = load_questions(path, check_audio=False, max_per_task=5)
    n = collections.Counter(q["task"] for q in small)  # ceil(5 / answers) of each answer: 6 of two answers, 6 of three, 8 of four
    assert 5 <= min(n.values()) and max(n.values()) <= 8
    with pytest.raises(ValueError, match="returned 1 answers"):
        run_benchmark(qs, lambda b: ["x"])


def test_normalisation_and_multiple_choice():
    q = {"answer": "B", "format": "mc", "options": ["female", "male"], "task": "gender", "chance": 0.5}
    assert is_correct(" b. ", q) and is_correct("Male", q) and is_correct("B) male", q)
    assert not is_correct("A", q) and not is_correct("it is male", q) and not is_correct(None, q)
    q = {"answer": "faster", "format": "open", "options": ["faster", "slower"]}
    assert is_correct("Faster!", q) and not is_correct("slower", q)


def test_constant_answer_scores_chance():
    rng = random.Random(0)
    qs = []
    for i in range(2000):  # 4-option multiple choice, right letter uniform: "A" is right 1 time in 4
        qs.append({"task": "accent", "format": "mc", "answer": LETTERS[rng.randrange(4)], "chance": 0.25,
                   "options": ["w", "x", "y", "z"]})
    s = score(qs, ["A"] * len(qs), seed=0)["accent"]
    assert s.chance == 0.25 and s.lo <= 0.25 <= s.hi and abs(s.accuracy - 0.25) < 0.04
    assert s.hi - s.lo < 0.06  # 2000 questions: a tight interval
    assert score(qs, ["A"] * len(qs), seed=0)["accent"] == s  # seeded bootstrap


def test_by_format_tells_a_model_that_hears_but_cannot_bind_letters():
    """An answerer that names the right value to open questions and says "A" to every lettered one:
    the per-task score averages the two, the format table shows both, and the collapse."""
    rng = random.Random(0)
    qs, preds = [], []
    for i in range(400):
        value = ("female", "male")[i % 2]
        if i % 4 < 2:
            qs.append({"task": "gender", "format": "open", "answer": value, "options": ["female", "male"], "chance": 0.5})
            preds.append(value)
        else:
            shown = ["female", "male"]
            rng.shuffle(shown)
            qs.append({"task": "gender", "format": "mc", "answer": LETTERS[shown.index(value)], "options": shown, "chance": 0.5})
            preds.append("A")
    qs.append({"task": "transcribe", "format": "open", "answer": "the cat", "options": [], "chance": 0.0})
    preds.append("the cat")  # not a texture question: not in the table
    rows = {r["format"]: r for r in by_format(qs, preds)}
    assert set(rows) == {"open", "mc"} and rows["open"]["n"] == rows["mc"]["n"] == 200
    assert rows["open"]["balanced"] == 1.0 and rows["open"]["top_answer_share"] == 0.5
    assert abs(rows["mc"]["balanced"] - 0.5) < 0.1 and rows["mc"]["top_answer"] == "a" and rows["mc"]["top_answer_share"] == 1.0
    assert abs(score(qs, preds)["gender"].balanced - 0.75) < 0.05  # what the per-task score alone says
    assert [r["format"] for r in by_format(qs, preds)] == ["open", "mc"]  # open first, as the notebook lists them
    with pytest.raises(ValueError, match="1 predictions for 401 questions"):
        by_format(qs, preds[:1])


def test_shuffled_audio_drops_an_audio_oracle_to_chance(corpus):
    rows, qs = corpus
    answer = audio_oracle(rows)
    good = run_benchmark(qs, answer)
    assert good["texture"].accuracy == 1.0
    shuf = shuffled_questions(qs, seed=0)
    own = {c: a for q in qs for c, a in zip(q["clip_ids"], q["audios"])}
    assert all(a != own[c] for q in shuf for c, a in zip(q["clip_ids"], q["audios"]))  # no clip keeps its audio
    bad = run_benchmark(shuf, answer)
    t = bad["texture"]
    assert t.accuracy < 0.6 and t.lo <= t.chance + 0.1, t  # fell to about chance
    assert bad["gender"].accuracy < 0.8 and good["gender"].accuracy == 1.0
    assert shuffled_questions(qs, seed=0) == shuf


def test_transcript_only_baseline_sees_text_not_audio(corpus):
    rows, qs = corpus
    seen = []

    def text_lm(batch):
        seen.extend(batch)
        # answers content questions from the transcript, guesses "A"/"yes" otherwise
        out = []
        for q in batch:
            if q["task"] == "last_word":
                out.append(q["question"].split('"')[1].split()[-1].strip("."))
            else:
                out.append("A" if q["format"] == "mc" else "yes")
        return out

    tq = transcript_questions(qs, {r["clip_id"]: r["text"] for r in rows})
    s = run_benchmark(tq, text_lm)
    assert all(q["audios"] == [] and q["question"].startswith("Transcript") for q in seen)
    assert any(q["question"].startswith("Transcript 1:") for q in seen if q["task"] == "same_speaker")
    assert s["last_word"].accuracy == 1.0 and s["texture"].accuracy < 0.7
    with pytest.raises(ValueError, match="no transcript"):
        transcript_questions(qs, {})


def fake_cache(path, rows, informative: bool, d: int = 16, seed: int = 0, voice: bool = False):
    """A FeatureCache on disk (index.json + one shard) whose state 1 encodes gender and accent when
    `informative` (and each voice as a direction of its own in the last dimensions with `voice`);
    state 0 is noise."""
    from omni.data.features import FORMAT_VERSION

    g = torch.Generator().manual_seed(seed)
    accents = sorted({r["accent"] for r in rows})
    voices = sorted({r["voice"] for r in rows})
    directions = torch.randn(len(voices), d - 1 - len(accents), generator=torch.Generator().manual_seed(99))
    chunks, index_rows, offset = [], [], 0
    for r in rows:
        frames = 5
        x = torch.randn(2, frames, d, generator=g)
        if informative:
            x[1, :, 0] += 3.0 * (r["gender"] == "female") - 3.0 * (r["gender"] == "male")
            x[1, :, 1 + accents.index(r["accent"])] += 4.0
            if voice:
                x[1, :, 1 + len(accents):] += 3.0 * directions[voices.index(r["voice"])]
        chunks.append(x)
        index_rows.append({"audio": r["audio"], "text": r["text"], "prompt": None, "labels": r,
                           "shard": 0, "offset": offset, "frames": frames, "line": 1})
        offset += frames
    path.mkdir(parents=True)
    save_file({"states": torch.cat(chunks, 1).to(torch.float16).contiguous()}, path / "shard_00000.safetensors")
    (path / "index.json").write_text(json.dumps({"format": FORMAT_VERSION, "n_states": 2, "d_model": d, "rows": index_rows}))
    from omni.data.features import FeatureCache

    return FeatureCache.open(path)


def test_probe_ceiling(corpus, tmp_path):
    rows, qs = corpus
    cache = fake_cache(tmp_path / "cache", rows, informative=True)
    s = run_benchmark(qs, probe_answerer(cache, qs))
    assert s["gender"].accuracy > 0.9 and s["accent"].accuracy > 0.9  # found on state 1 (chosen on val)
    assert "transcribe" not in s and "last_word" not in s and "same_speaker" in s  # no clip label: not taken; pairs: the pair probe
    noise = run_benchmark(qs, probe_answerer(fake_cache(tmp_path / "noise", rows, informative=False), qs, layers=[0]))
    assert noise["accent"].accuracy < 0.6
    fig = texture_scores({"probe": s, "noise probe": noise}, title="toy")
    ax = fig.axes[0]
    assert len(ax.patches) == len(s) + len(noise) and [t.get_text() for t in ax.get_xticklabels()][-1] == "texture"
    with pytest.raises(ValueError, match="not in the feature cache"):
        probe_answerer(fake_cache(tmp_path / "part", rows[:50], informative=True), qs)


def test_ask_batches_one_task_at_a_time_and_keeps_the_order(corpus):
    rows, qs = corpus
    seen = []

    def answer(batch):
        seen.append({q["task"] for q in batch})
        return [q["line"] for q in batch]

    assert ask(qs, answer, batch_size=7) == [q["line"] for q in qs]
    assert all(len(s) == 1 for s in seen) and max(len(s) for s in seen) == 1
    assert len(seen) >= len({q["task"] for q in qs})


def test_probe_reads_the_questions_clips_from_another_cache(corpus, tmp_path):
    """A separate test corpus: the probe fits on the corpus cache's train split and reads the
    questions' clips from the other cache; a cache of another encoder (width) is refused."""
    rows, qs = corpus
    train_rows = [r for r in rows if r["split"] != "test"]
    test_rows = [dict(r, clip_id=f"hard_{r['clip_id']}") for r in rows if r["split"] == "test"]
    hard_qs = [dict(q, clip_ids=[f"hard_{c}" for c in q["clip_ids"]]) for q in qs]
    main = fake_cache(tmp_path / "main", train_rows, informative=True)
    other = fake_cache(tmp_path / "other", test_rows, informative=True, seed=1)
    with pytest.raises(ValueError, match="not in the feature cache"):
        probe_answerer(main, hard_qs)
    s = run_benchmark(hard_qs, probe_answerer(main, hard_qs, clips=other))
    assert s["gender"].accuracy > 0.9 and s["accent"].accuracy > 0.9
    with pytest.raises(ValueError, match="not the same encoder"):
        probe_answerer(main, hard_qs, clips=fake_cache(tmp_path / "wide", test_rows, informative=True, d=24))


def _scores(acc: dict[str, float], chance: float = 0.5, n: int = 100) -> dict[str, TaskScore]:
    return {t: TaskScore(t, a, max(0.0, a - 0.1), min(1.0, a + 0.1), chance, n) for t, a in acc.items()}


def test_table_headline_bar_and_sentences_from_the_numbers():
    model = _scores({"gender": 0.95, "pitch": 0.55, "style": 0.40, "transcribe": 0.0})
    results = {"model": model, "transcript only (reference)": _scores({"gender": 0.5, "pitch": 0.5, "style": 0.45, "transcribe": 0.0}),
               "shuffled audio": _scores({"gender": 0.52, "pitch": 0.50, "style": 0.30}),
               "linear probe": _scores({"gender": 1.0, "pitch": 0.9, "style": 0.9})}
    table = task_table(results)
    assert [r["task"] for r in table] == ["gender", "pitch", "style", "transcribe"]
    row = dict(table[0])
    assert all(np.isnan(row.pop(k)) for k in ("balanced", "valid", "train_majority"))  # not given here
    assert row == {"task": "gender", "n": 100, "accuracy": 0.95, "ci_lo": 0.85, "ci_hi": 1.0, "chance": 0.5,
                   "transcript_only": 0.5, "shuffled": 0.52, "probe": 1.0}
    assert np.isnan(table[3]["probe"])
    h = headline(results, "hard_")
    assert h["hard_texture_mean"] == pytest.approx((0.95 + 0.55 + 0.40) / 3) and h["hard_texture_chance_mean"] == 0.5
    assert h["hard_transcript_only_texture_mean"] == pytest.approx((0.5 + 0.5 + 0.45) / 3)
    assert h["hard_texture_tasks_above_transcript_only"] == 2 and h["hard_acc_gender"] == 0.95
    ok, why = meets_bar(results)  # accent, rate not asked; style below transcript-only; the mean short
    assert not ok and "NOT met" in why and "style 0.40 vs transcript only 0.45" in why and "accent not asked" in why
    said = findings(results)
    assert said[0].startswith("hears gender: 0.95 [0.85, 1.00] (n=100) vs chance 0.50, transcript-only 0.50")
    assert said[1].startswith("partly hears pitch") and said[2].startswith("does not hear style")
    assert len(said) == 3  # texture tasks only


# --- the sample, the baselines and the bar --------------------------------------------------


def _open_gender(rows, seed: int = 1):
    """Open gender questions only (mc_fraction 0): a binary task answered in words."""
    return build_instructions(rows, InstructionConfig(seed=seed, tasks=("gender",), mc_fraction=0.0))


def test_the_sample_is_stratified_so_a_constant_answer_scores_chance_whatever_the_seed(tmp_path):
    """Scoring sample: 150 questions per task, an equal share per answer; a constant answer on a binary
    task then scores 0.5 for every seed (40 plain draws from a 2:1 set scored anywhere in 0.42-0.70)."""
    rows = fake_rows({"train": 40, "test": 600})
    test = [r for r in rows if r["split"] == "test"]
    assert sum(r["gender"] == "female" for r in test) != sum(r["gender"] == "male" for r in test)  # not balanced as rendered
    path = write_manifest(tmp_path / "test.jsonl", _open_gender(rows)["test"])
    for seed in range(4):
        qs = load_questions(path, check_audio=False, max_per_task=150, seed=seed)
        assert len(qs) == 150 and sum(q["answer"] == "male" for q in qs) == 75
        s = score(qs, ["male"] * len(qs))["gender"]
        assert s.accuracy == 0.5 and s.balanced == 0.5
    # tasks with four answers: up to ceil(150 / 4) each
    sets = build_instructions(rows, InstructionConfig(seed=1, tasks=("accent",)))
    qs = load_questions(write_manifest(tmp_path / "acc.jsonl", sets["test"]), check_audio=False, max_per_task=150)
    from omni.data.instructions import answer_value

    counts = collections.Counter(answer_value(q) for q in qs)
    assert len(counts) == 4 and set(counts.values()) == {38}


def test_train_majority_valid_share_and_balanced_accuracy(tmp_path):
    """Label prior shift: a model that learned the training prior (train: 2 of 3 male) answers "male"
    to every gender question; on the stratified test sample it scores chance, and balanced accuracy
    says chance on any sample. The share of valid answers separates form from information."""
    rows = fake_rows({"train": 300, "test": 300})
    train = [dict(r, gender="male" if i % 3 else "female") for i, r in enumerate(rows) if r["split"] == "train"]
    test = [dict(r, gender="female" if i % 3 else "male") for i, r in enumerate(rows) if r["split"] == "test"]
    sets = build_instructions(train + test, InstructionConfig(seed=1, tasks=("gender", "style")))
    prior = majority_answerer(sets["train"])
    path = write_manifest(tmp_path / "test.jsonl", sets["test"])
    everything = load_questions(path, check_audio=False)
    biased = score(everything, ask(everything, prior))["gender"]
    assert biased.accuracy < 0.4 and biased.balanced == 0.5  # below chance on the raw held-out mix; balanced: chance
    qs = load_questions(path, check_audio=False, max_per_task=150)
    s = run_benchmark(qs, prior)
    assert s["gender"].accuracy == 0.5 and s["gender"].valid == 1.0
    said = prior([q for q in qs if q["task"] == "gender"][:40])
    assert {a for a in said if len(a) > 1} == {"male"} and {a for a in said if len(a) == 1} <= set(LETTERS)  # letters in multiple choice
    # valid share: an answer of the wrong form is not valid, a letter or an option is
    q_mc = next(q for q in qs if q["format"] == "mc" and q["task"] == "gender")
    q_open = next(q for q in qs if q["format"] == "open" and q["task"] == "gender")
    s = score([q_mc, q_open, q_open], ["B", "yes", "female"])["gender"]
    assert s.valid == pytest.approx(2 / 3)


def test_probes_cover_the_models_task_set_and_transcript_only_reads_only_the_text(corpus, tmp_path):
    """Baselines: the Whisper probe answers same speaker too (a pair probe), so it covers every texture
    task the model is asked; the transcript-only baseline is a probe on the transcript's text, fitted on
    the training clips (what the words give away), and never asks the tuned model anything."""
    rows, qs = corpus
    cache = fake_cache(tmp_path / "cache", rows, informative=True, voice=True)
    s = run_benchmark(qs, probe_answerer(cache, qs))
    asked = {q["task"] for q in qs} & set(TEXTURE_TASKS)
    assert asked <= set(s) and s["same_speaker"].accuracy > 0.75 and s["same_speaker"].valid == 1.0
    corpus_rows = [dict(r) for r in rows]
    text = {r["clip_id"]: r["text"] for r in rows}
    t = run_benchmark(qs, text_probe_answerer(corpus_rows, qs, text))
    assert asked <= set(t) and "transcribe" not in t
    assert t["gender"].accuracy < 0.8 and t["texture"].accuracy < 0.65  # random words: the text says little
    # a corpus whose words give the gender away: the transcript probe finds it
    told = [dict(r, text=("She said " if r["gender"] == "female" else "He said ") + r["text"]) for r in rows]
    said = {r["clip_id"]: r["text"] for r in told}
    g = [q for q in qs if q["task"] == "gender"]
    assert run_benchmark(g, text_probe_answerer(told, g, said))["gender"].accuracy > 0.95


def test_the_required_line():
    """meets_bar is the texture bar: each of gender, accent, rate, pitch, style 10 points above shuffled
    audio and above train majority and transcript-only; the texture mean 25 points above the floor."""
    good = {"gender": 0.95, "accent": 0.9, "rate": 0.8, "pitch": 0.8, "style": 0.9}
    flat = {t: 0.5 for t in good}
    results = {"model": _scores(good), "train majority": _scores(flat), "transcript only (reference)": _scores(flat),
               "shuffled audio": _scores(flat), "linear probe": _scores({t: 1.0 for t in good})}
    ok, why = meets_bar(results)
    assert ok and "met" in why
    h = headline(results)
    assert h["texture_floor_mean"] == 0.5 and h["train_majority_texture_mean"] == 0.5
    ok, why = meets_bar({**results, "shuffled audio": _scores({**flat, "rate": 0.75})})
    assert not ok and "rate 0.80 vs shuffled audio 0.75 + 0.10" in why
    ok, why = meets_bar({**results, "train majority": _scores({**flat, "style": 0.9})})
    assert not ok and "style 0.90 vs train majority 0.90" in why and "gender" not in why
    weak = {t: a - 0.2 for t, a in good.items()}  # each above its baselines, the mean not 25 points above the floor
    ok, why = meets_bar({**results, "model": _scores(weak)})
    assert not ok and "NOT met" in why
