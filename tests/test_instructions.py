"""Instruction data from the synth corpus's labels: determinism, split hygiene, every task, answers
that agree with the labels, and the CLI."""

import collections
import json
import re
from pathlib import Path

import pytest

from omni.data.instructions import (
    LETTERS, STYLE_NAMES, TASKS, InstructionConfig, accent_name, build_instructions, load_corpus_rows,
    words, write_instructions,
)
from omni.data.manifest import AUDIO_TAG, read_manifest


def small_corpus_config(out: Path):
    """Few voices, so that a voice speaks several clips of a split (same-speaker questions need a
    second clip of the voice) and every style and accent of the tasks appears; about 30 clips."""
    from omni.data.synth import SynthConfig

    return SynthConfig(out=str(out), sentences=24, min_words=3, max_words=6, test_fraction=0.34, workers=1,
                       accents=("en-us", "en-gb"), variants=("f1", "m1", "klatt", "whisper", "croak", "f4", "m4"),
                       heldout_variants=("f4", "m4"))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    from omni.data.synth import build_corpus

    return build_corpus(small_corpus_config(tmp_path_factory.mktemp("instr") / "corpus"))


@pytest.fixture(scope="session")
def sets(small_corpus):
    rows = load_corpus_rows(small_corpus)
    return rows, build_instructions(rows, InstructionConfig(seed=3))


def test_deterministic_and_seed_matters(small_corpus, sets):
    rows, a = sets
    b = build_instructions(load_corpus_rows(small_corpus), InstructionConfig(seed=3))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = build_instructions(rows, InstructionConfig(seed=4))
    assert json.dumps(a, sort_keys=True) != json.dumps(c, sort_keys=True)


def test_split_hygiene(sets):
    rows, s = sets
    by_id = {r["clip_id"]: r for r in rows}
    assert set(s) >= {"train", "val", "test"}
    for split, qs in s.items():
        for q in qs:  # every clip of a question, partner included, is from the question's split
            assert {by_id[c]["split"] for c in q["clip_ids"]} == {split}, q
    train_clips = [by_id[c] for q in s["train"] for c in q["clip_ids"]]
    test_clips = [by_id[c] for q in s["test"] for c in q["clip_ids"]]
    assert {r["voice"] for r in train_clips}.isdisjoint({r["voice"] for r in test_clips})
    assert {r["sentence_id"] for r in train_clips}.isdisjoint({r["sentence_id"] for r in test_clips})
    train_text = " ".join(m["value"] for q in s["train"] for m in q["conversations"])
    for r in {r["clip_id"]: r for r in test_clips}.values():
        assert r["text"] not in train_text and r["audio"] not in train_text


def test_every_task_present_in_train_and_test(sets):
    _, s = sets
    for split in ("train", "test"):
        tasks = collections.Counter(q["task"] for q in s[split])
        assert set(tasks) == set(TASKS) | ({"multi_turn"} if split == "train" else set()), (split, tasks)
    fmts = collections.Counter((q["task"], q["format"]) for q in s["train"] + s["test"])
    assert fmts[("gender", "mc")] and fmts[("gender", "open")] and fmts[("accent", "mc")]
    assert all(q["format"] == "open" for q in s["train"] if q["task"] in ("transcribe", "same_speaker"))


def test_answers_agree_with_labels(sets):
    rows, s = sets
    by_id = {r["clip_id"]: r for r in rows}
    n_yes = collections.Counter()
    where = collections.Counter()
    for q in s["train"] + s["val"] + s["test"]:
        if q["task"] == "multi_turn":
            continue
        user, bot = q["conversations"]
        assert bot["value"] == q["answer"]
        r = by_id[q["clip_ids"][0]]
        tag = " ".join(f"<audio>{by_id[c]['audio']}</audio>" for c in q["clip_ids"])
        assert user["value"].startswith(tag) or user["value"].endswith(tag)
        where[user["value"].startswith("<audio>")] += 1
        if q["format"] == "mc":  # letters, lettered options in the question, chance 1/options
            k = LETTERS.index(q["answer"])
            assert f"{q['answer']}) {q['options'][k]}" in user["value"]
            assert q["chance"] == pytest.approx(1 / len(q["options"])) and len(q["options"]) >= 2
            said = q["options"][k]
        else:
            said = q["answer"]
        t = q["task"]
        expected = {
            "transcribe": r["text"], "gender": r["gender"], "accent": accent_name(r["accent"]),
            "style": STYLE_NAMES[r["style"]], "rate": r["rate_bucket"], "pitch": r["pitch_bucket"],
            "rate_compare": {"fast": "faster", "slow": "slower"}.get(r["rate_bucket"]),
            "pitch_compare": {"high": "higher", "low": "lower"}.get(r["pitch_bucket"]),
            "last_word": words(r["text"])[-1],
            "describe": ", ".join(([r["gender"]] if r["gender"] in ("female", "male") else [])
                                  + [r["rate_bucket"], r["pitch_bucket"], STYLE_NAMES[r["style"]]]),
        }
        if t in expected:
            assert said == expected[t], q
        elif t == "same_speaker":
            other = by_id[q["clip_ids"][1]]
            assert user["value"].count("<audio>") == 2 and other["sentence_id"] != r["sentence_id"]
            assert said == ("yes" if other["voice"] == r["voice"] else "no")
            n_yes[t, said] += 1
        elif t == "mention":
            word = re.search(r"'(.+)'", user["value"]).group(1)
            assert said == ("yes" if word in words(r["text"]) else "no")
            n_yes[t, said] += 1
    assert where[True] > 2 * where[False] > 0  # audio mostly first, sometimes after the question
    for t in ("same_speaker", "mention"):  # both answers occur: a constant answer cannot score 1
        assert n_yes[t, "yes"] and n_yes[t, "no"], n_yes
    # styles of the corpus become listener words; gender is never asked of a voice without one
    assert {q["options"][LETTERS.index(q["answer"])] for q in s["train"] if q["task"] == "style" and q["format"] == "mc"} \
        <= {"synthetic-sounding", "whispered", "creaky", "normal"}
    assert not [q for q in s["train"] if q["task"] == "gender" and by_id[q["clip_ids"][0]]["gender"] == "other"]


def test_multi_turn_chains(sets):
    """2-3 of a clip's own questions in one conversation; the audio in the first user turn only."""
    rows, s = sets
    single = {(q["clip_ids"][0], AUDIO_TAG.sub("", q["conversations"][0]["value"]).strip(), q["answer"])
              for q in s["train"] if q["task"] != "multi_turn"}
    chains = [q for q in s["train"] if q["task"] == "multi_turn"]
    assert chains and not [q for q in s["test"] if q["task"] == "multi_turn"]
    assert {len(q["conversations"]) for q in chains} == {4, 6}
    for q in chains:
        turns = q["conversations"]
        assert [t["from"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert "<audio>" in turns[0]["value"] and not any("<audio>" in t["value"] for t in turns[1:])
        for u, a in zip(turns[::2], turns[1::2]):
            assert (q["clip_ids"][0], AUDIO_TAG.sub("", u["value"]).strip(), a["value"]) in single
        assert q["answer"] == turns[-1]["value"]


def test_written_manifests_parse_and_cli(small_corpus, tmp_path, capsys):
    from omni.cli import main

    out = tmp_path / "instr"
    assert main(["data", "instructions", "--corpus", str(small_corpus), "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "test:" in printed and "same_speaker" in printed
    m = read_manifest(out / "test.jsonl")  # audio checked: the relative paths resolve to the clips
    assert len(m) == sum(1 for line in (out / "test.jsonl").read_text().splitlines() if line.strip())
    two = [e for e in m if e.labels["task"] == "same_speaker"]
    assert two and all(len(e.audios) == 2 and all(p.is_file() for p in e.audios) for e in two)
    assert "<audio>../" in (out / "test.jsonl").read_text() or "<audio>/" in (out / "test.jsonl").read_text()
    again = write_instructions(InstructionConfig(corpus=str(small_corpus), out=str(out), seed=3))
    assert again["test"].read_text() == (out / "test.jsonl").read_text()


def test_bad_config_and_missing_corpus(tmp_path):
    with pytest.raises(ValueError, match="tasks"):
        build_instructions([], InstructionConfig(tasks=("gender", "colour")))
    with pytest.raises(ValueError, match="chains"):
        build_instructions([], InstructionConfig(chains=-1))
    with pytest.raises(ValueError, match="max_options"):
        build_instructions([], InstructionConfig(max_options=1))
    with pytest.raises(FileNotFoundError, match="omni data synth"):
        load_corpus_rows(tmp_path)


def test_a_separate_test_corpus_takes_its_options_from_the_training_corpus(sets):
    """A hard corpus (one split, fewer styles) asked with options_from the training corpus offers the
    same answer sets, at the same chance; a value the option corpus lacks is refused by name."""
    rows, _ = sets
    hard = [dict(r, split="test_hard") for r in rows if r["split"] == "test" and r["style"] == "normal"]
    cfg = InstructionConfig(seed=3)
    alone = build_instructions(hard, cfg)["test_hard"]
    shared = build_instructions(hard, cfg, option_rows=rows)["test_hard"]
    style_sets = lambda qs: {tuple(sorted(q["options"])) for q in qs if q["task"] == "style" and q["format"] == "open"}
    assert style_sets(alone) == {("normal",)} or not style_sets(alone)  # alone: one style, no question worth asking
    assert style_sets(shared) == {tuple(sorted(STYLE_NAMES[s] for s in {r["style"] for r in rows}))}
    assert all(q["split"] == "test_hard" for q in shared) and not any(q["task"] == "multi_turn" for q in shared)
    with pytest.raises(ValueError, match="not among the answer set"):
        build_instructions([dict(hard[0], accent="en-029")], InstructionConfig(seed=3, tasks=("accent",)), option_rows=rows)
