import re

import pytest

from omni.data import text


def test_sentences_count_length_and_cleanliness():
    ss = text.sentences()
    assert len(ss) >= 3000
    assert len({text.sentence_key(s) for s in ss}) == len(ss)  # deduplicated
    for s in ss:
        assert 5 <= len(s.split()) <= 25, s
        assert re.fullmatch(r"[A-Z][A-Za-z ,;:'.!?-]*[.!?]", s), s  # no digits, quotes, symbols
        assert "  " not in s and '"' not in s
    assert ss == text.sentences()  # deterministic order
    short = text.sentences(min_words=3, max_words=6)
    assert all(3 <= len(s.split()) <= 6 for s in short) and len(short) > 500


def test_split_keeps_titles_and_splits_dialogue():
    got = text.split_sentences('"Come in," said I. Mr. St. Clair came. J. Smith left. "No." "Are you?" he asked. Yes!')
    assert got == ['"Come in," said I.', "Mr. St. Clair came.", "J. Smith left.", '"No."', '"Are you?" he asked.', "Yes!"]


@pytest.mark.parametrize(
    "raw,ok",
    [
        ("\u201cIt is a curious thing,\u201d remarked Holmes.", "It is a curious thing, remarked Holmes."),
        ("He was there \u2014 alone and cold.", "He was there, alone and cold."),
        ("Mr. Holmes met the horse's owner.", "Mr. Holmes met the horse's owner."),
        ("It was on the twentieth of March, 1888.", None),  # digits
        ('"Is it so?" he asked.', None),  # internal question mark
        ("He read the letter from the FBI office.", None),  # acronym
        ("Then the treble K was printed there.", None),  # a letter spoken as a letter
        ("Voil\u00e0 tout, said the man.", None),  # accent
        ("He said 'go home' and left.", None),  # single quotes
        ("He went to St. Clair's house at once.", None),  # saint or street?
    ],
)
def test_speakable(raw, ok):
    assert text.speakable(text.normalize(raw)) == ok


def test_lm_corpus_and_splits():
    corpus = text.lm_corpus()
    assert len(corpus.encode()) > 500_000
    assert "Sherlock Holmes" in corpus and "\n\n" in corpus
    train, val = text.lm_splits(0.02)
    assert 0.005 < len(val) / (len(train) + len(val)) < 0.05
    assert (train, val) == text.lm_splits(0.02)  # deterministic
    assert text.lm_splits(0.02, seed=1) != (train, val)
    # no chunk of validation text is also in train
    for chunk in val.split("\n\n")[:20]:
        assert chunk not in train


def test_exclude_removes_test_sentences_from_lm_text():
    ss = text.sentences()
    held = set(ss[100:200])  # speech-side form: quotes stripped, dashes turned into commas
    train, val = text.lm_splits(0.01, exclude=held)
    full = text.lm_corpus(exclude=held)
    lm_keys = {text.sentence_key(s) for p in re.split(r"\n\n", train + "\n\n" + val) for s in text.split_sentences(p)}
    assert not lm_keys & {text.sentence_key(s) for s in held}
    assert len(full) < len(text.lm_corpus())
    # without exclusion they are there: the check above can fail
    lm_all = {text.sentence_key(s) for p in text.lm_corpus().split("\n\n") for s in text.split_sentences(p)}
    assert {text.sentence_key(s) for s in held} <= lm_all


def test_unknown_or_missing_source_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown text source"):
        text.source_files("nope")
    monkeypatch.setitem(text.SOURCES, "ghost", text.Source("ghost", "no_such_pkg_xyz", "no-such-pkg==1", "data"))
    with pytest.raises(RuntimeError, match="pip install no-such-pkg==1"):
        text.source_files("ghost")
