import collections
import dataclasses
import json

import pytest

from omni.data import synth, text
from omni.data.manifest import read_manifest

LABELS = {"voice", "speaker", "accent", "variant", "gender", "style", "rate", "rate_bucket", "pitch",
          "pitch_bucket", "pitch_range", "duration", "split", "sentence_id", "clip_id"}


def small(out, **kw) -> synth.SynthConfig:
    return synth.SynthConfig(out=str(out), sentences=14, min_words=3, max_words=6, workers=1, **kw)


def test_default_plan_splits_are_disjoint_by_sentence_and_voice():
    cfg = synth.SynthConfig()
    clips = synth.plan(cfg)
    by = collections.defaultdict(list)
    for c in clips:
        by[c.split].append(c)
    assert {k: len(v) for k, v in by.items()} == {"train": 2550, "val": 150, "test_seen_voice": 300, "test": 300}
    sents = {k: {c.text for c in v} for k, v in by.items()}
    assert not sents["train"] & (sents["val"] | sents["test"] | sents["test_seen_voice"])
    assert not sents["val"] & sents["test"]
    assert sents["test"] == sents["test_seen_voice"]  # same sentences, seen vs unseen voices
    seen, held = synth.voices(cfg)
    assert not set(seen) & set(held)
    assert {c.voice for k in ("train", "val", "test_seen_voice") for c in by[k]} <= set(seen)
    assert {c.voice for c in by["test"]} <= set(held)
    assert {c.gender for c in by["test"]} >= {"female", "male"}
    assert {c.accent for c in by["test"]} == set(cfg.accents)
    counts = collections.Counter(c.voice for c in by["train"])
    assert set(counts) == set(seen) and max(counts.values()) - min(counts.values()) <= 1  # balanced
    for c in clips:
        assert cfg.rate[0] <= c.rate <= cfg.rate[1] and cfg.pitch[0] <= c.pitch <= cfg.pitch[1]
        assert c.style == ("whisper" if "whisper" in c.variant else c.style)
    assert {c.rate_bucket for c in clips} == {"slow", "medium", "fast"}
    assert {c.gender for c in clips} == {"female", "male", "other"}
    assert len({c.clip_id for c in clips}) == len(clips)
    # the LM can exclude exactly the held-out transcripts
    assert synth.held_out_sentences(cfg) == sents["val"] | sents["test"]


def test_config_is_checked():
    with pytest.raises(ValueError, match="must include a female and a male"):
        synth.plan(dataclasses.replace(synth.SynthConfig(), heldout_variants=("f4", "f5")))
    with pytest.raises(ValueError, match="unknown voice variants"):
        synth.plan(dataclasses.replace(synth.SynthConfig(), variants=("f1", "m1", "nope")))
    with pytest.raises(ValueError, match="only .* sentences"):
        synth.plan(dataclasses.replace(synth.SynthConfig(), sentences=10**6))


def test_build_is_deterministic_idempotent_and_resumable(tmp_path):
    a = synth.build_corpus(small(tmp_path / "a"))
    m = read_manifest(a / "manifest.jsonl")  # validates every clip: exists, readable, <= 30 s
    assert len(m) == 15 and all(e.duration > 0.3 for e in m)  # 12 train, 1 val, 1 test + 1 test_seen_voice
    for e in m:
        assert LABELS <= set(e.labels) and e.labels["speaker"] == f"{e.labels['accent']}+{e.labels['variant']}"
    assert {e.labels["split"] for e in m} == set(synth.SPLITS)
    for split in synth.SPLITS:
        assert len(read_manifest(a / f"{split}.jsonl", check_audio=False)) == sum(e.labels["split"] == split for e in m)

    # same seed, two worker processes: identical manifest and identical wav bytes
    b = synth.build_corpus(dataclasses.replace(small(tmp_path / "b"), workers=2))
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()
    wavs = sorted(p.name for p in (a / "clips").glob("*.wav"))
    assert len(wavs) == 15 and wavs == sorted(p.name for p in (b / "clips").glob("*.wav"))
    assert all((a / "clips" / n).read_bytes() == (b / "clips" / n).read_bytes() for n in wavs)

    # a rerun writes nothing; deleting one wav rebuilds only that one
    files = sorted(p for p in a.rglob("*") if p.is_file())
    stamp = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    synth.build_corpus(small(tmp_path / "a"))
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == stamp
    victim = a / "clips" / wavs[3]
    before = victim.read_bytes()
    victim.unlink()
    synth.build_corpus(small(tmp_path / "a"))
    changed = [p for p in files if (p.stat().st_ino, p.stat().st_mtime_ns) != stamp[p]]
    assert changed == [victim] and victim.read_bytes() == before

    # another seed gives another corpus
    c = synth.plan(small(tmp_path / "c", seed=1))
    assert [x.clip_id for x in c] != [json.loads(line)["clip_id"] for line in (a / "manifest.jsonl").read_text().splitlines()]


def test_datasheet(tmp_path):
    out = synth.build_corpus(small(tmp_path / "corpus"))
    page = synth.datasheet(out, tmp_path / "reports")
    html = page.read_text()
    assert page.name == "synth_datasheet.html" and (tmp_path / "reports" / "synth_durations.png").stat().st_size > 1000
    assert "15 clips" in html and "<td>train</td><td>12</td>" in html and "<td>test</td><td>1</td>" in html
    assert html.count("<audio controls") >= 4 and "../corpus/clips/" in html


def test_lm_text_can_exclude_the_corpus_test_sentences():
    cfg = synth.SynthConfig()
    held = synth.held_out_sentences(cfg)
    train, _ = text.lm_splits(0.01, exclude=held)
    keys = {text.sentence_key(s) for p in train.split("\n\n") for s in text.split_sentences(p)}
    assert len(held) == 450 and not keys & {text.sentence_key(s) for s in held}


def test_hard_split_voices_made_differently_from_training(tmp_path):
    """test_hard: test sentences, held-out variants, rate and pitch outside the training ranges,
    buckets against the training ranges; the default plan is unchanged; `only` renders just it."""
    cfg = synth.SynthConfig(hard_clips=40)
    base = synth.plan(synth.SynthConfig())
    clips = synth.plan(cfg)
    assert clips[: len(base)] == base  # the corpus itself is unchanged by a hard set
    hard = [c for c in clips if c.split == synth.HARD]
    assert len(hard) == 40 and len(clips) == len(base) + 40
    test_sents = {c.text for c in base if c.split == "test"}
    _, held = synth.voices(cfg)
    assert {c.text for c in hard} <= test_sents and {c.voice for c in hard} <= set(held)
    for c in hard:
        assert 85 <= c.rate <= 120 or 245 <= c.rate <= 300
        assert 0 <= c.pitch <= 15 or 85 <= c.pitch <= 99
        assert c.rate_bucket == ("slow" if c.rate < 130 else "fast") and c.pitch_bucket == ("low" if c.pitch < 25 else "high")
    assert {c.rate_bucket for c in hard} == {"slow", "fast"} and {c.pitch_bucket for c in hard} == {"low", "high"}
    assert {c.gender for c in hard} >= {"female", "male"}
    assert [c.clip_id for c in synth.plan(dataclasses.replace(cfg, only=(synth.HARD,)))] == [c.clip_id for c in hard]

    out = synth.build_corpus(small(tmp_path / "hard", hard_clips=3, only=(synth.HARD,)))
    m = read_manifest(out / "manifest.jsonl")
    assert len(m) == 3 and {e.labels["split"] for e in m} == {synth.HARD}
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["manifest.jsonl", "test_hard.jsonl"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["hard_clips"] == 3 and meta["counts"] == {synth.HARD: 3}


@pytest.mark.parametrize("change, message", [
    ({"hard_rate": (85, 140, 245, 300)}, r"hard_rate=.*below and \[c, d\] above the training range \(130, 230\)"),
    ({"hard_pitch": (0, 15, 60, 99)}, r"hard_pitch=.*training range \(25, 75\)"),
    ({"hard_pitch": (0, 15, 85, 120)}, r"espeak pitch is 0-99"),
    ({"hard_clips": -1}, r"hard_clips must be >= 0"),
    ({"only": ("test_hard",), "hard_clips": 0}, r"test_hard needs hard_clips > 0"),
    ({"only": ("dev",)}, r"unknown splits \['dev'\]"),
])
def test_hard_config_is_checked(change, message):
    with pytest.raises(ValueError, match=message):
        synth.plan(dataclasses.replace(synth.SynthConfig(hard_clips=10), **change))



def test_prepare_corpus_builds_a_missing_corpus_once_and_uses_an_existing_one_as_it_is(tmp_path):
    """What `omni run` of an alignment or instruct recipe does on a fresh machine: the corpus is built
    when it has no manifest; a corpus already there is never rebuilt, whatever config is asked."""
    out = tmp_path / "corpus"
    assert synth.prepare_corpus(small(out)) == out
    rows = (out / "manifest.jsonl").read_text()
    assert len(rows.splitlines()) == len(synth.plan(small(out)))
    stamp = (out / "manifest.jsonl").stat().st_mtime_ns
    synth.prepare_corpus(dataclasses.replace(small(out), sentences=20))  # another size: the corpus there is used as it is
    assert (out / "manifest.jsonl").stat().st_mtime_ns == stamp and (out / "manifest.jsonl").read_text() == rows
    assert not list(tmp_path.glob(".corpus.prepare.lock"))  # no lock left behind


def test_an_instruct_run_builds_the_default_corpus_when_it_is_missing(tmp_path, monkeypatch):
    """A fresh machine's `omni run experiments/instruct.yaml`: the default corpus is built (as `omni data
    synth` builds it) before its instructions and features, not refused as missing."""
    from omni.experiments import instruct

    asked = []

    def record(cfg):
        asked.append(cfg)
        raise RuntimeError("stop here")

    monkeypatch.setattr(instruct, "prepare_corpus", record)
    with pytest.raises(RuntimeError, match="stop here"):
        instruct.prepare_data(instruct.InstructConfig(corpus=str(tmp_path / "synth"), instructions=str(tmp_path / "instructions")))
    (cfg,) = asked
    assert cfg.out == str(tmp_path / "synth") and cfg.sentences == synth.SynthConfig().sentences and cfg.seed == 0
    assert not (tmp_path / "instructions").exists()  # nothing was built before the corpus
