import numpy as np
import pytest
import soundfile as sf

from omni.data.librispeech import librispeech_manifest
from omni.data.manifest import ManifestError, read_manifest

SPEAKERS = """; Some comment
;ID  |SEX| SUBSET           |MINUTES| NAME
19   | F | dev-clean        | 25.19 | Kara Shallenberg
26   | M | dev-clean        | 25.08 | Denny Sayers
"""


def _fixture(tmp_path):
    """LibriSpeech/SPEAKERS.TXT + dev-clean/{19,26}/{chapter x2}/ with 2 utterances each."""
    top = tmp_path / "LibriSpeech"
    root = top / "dev-clean"
    top.mkdir()
    (top / "SPEAKERS.TXT").write_text(SPEAKERS)
    rng = np.random.default_rng(0)
    for spk, chapters in (("19", ("198", "227")), ("26", ("495", "496"))):
        for ch in chapters:
            d = root / spk / ch
            d.mkdir(parents=True)
            lines = []
            for u in range(2):
                uid = f"{spk}-{ch}-{u:04d}"
                sf.write(str(d / f"{uid}.flac"), 0.1 * rng.standard_normal(1600 * (u + 1)), 16000)
                lines.append(f"{uid} WORDS OF SPEAKER {spk} CHAPTER {ch} NUMBER {u}")
            (d / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def test_manifest_from_layout(tmp_path):
    root = _fixture(tmp_path)
    out = tmp_path / "out" / "dev.jsonl"
    assert librispeech_manifest(root, out) == 8
    m = read_manifest(out)
    assert len(m) == 8
    first = m[0]
    assert first.text == "WORDS OF SPEAKER 19 CHAPTER 198 NUMBER 0"
    assert first.labels == {"speaker": "19", "chapter": "198", "id": "19-198-0000", "subset": "dev-clean", "gender": "female"}
    assert first.audio.resolve() == (root / "19" / "198" / "19-198-0000.flac").resolve()
    assert first.duration == pytest.approx(0.1)
    assert {e.labels["gender"] for e in m if e.labels["speaker"] == "26"} == {"male"}
    assert {(e.labels["speaker"], e.labels["chapter"]) for e in m} == {("19", "198"), ("19", "227"), ("26", "495"), ("26", "496")}
    # the parent folder (several subsets) works too
    assert librispeech_manifest(root.parent, tmp_path / "all.jsonl") == 8


def test_malformed_line_and_missing_flac_name_file_and_line(tmp_path):
    root = _fixture(tmp_path)
    trans = root / "19" / "198" / "19-198.trans.txt"
    trans.write_text(trans.read_text() + "garbage\n19-198-0007 NO AUDIO FOR THIS ONE\n26-495-0000 WRONG FILE\n")
    with pytest.raises(ManifestError) as ei:
        librispeech_manifest(root, tmp_path / "m.jsonl")
    msg = str(ei.value)
    assert f"{trans}:3: malformed transcript line" in msg
    assert f"{trans}:4: no audio for 19-198-0007" in msg
    assert f"{trans}:5: id 26-495-0000 does not belong to 19-198" in msg
    assert not (tmp_path / "m.jsonl").exists()  # nothing written when the corpus is bad


def test_flac_without_transcript_is_counted_and_warned(tmp_path):
    root = _fixture(tmp_path)
    sf.write(str(root / "26" / "495" / "26-495-0009.flac"), np.zeros(160) + 0.1, 16000)
    with pytest.warns(UserWarning, match="1 flac file"):
        n = librispeech_manifest(root, tmp_path / "m.jsonl")
    assert n == 8


def test_not_a_librispeech_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="trans.txt"):
        librispeech_manifest(tmp_path, tmp_path / "m.jsonl")


def test_bad_flacs_named_by_transcript_line_or_skipped_and_listed(tmp_path, capsys):
    root = _fixture(tmp_path)
    d = root / "26" / "495"
    sf.write(str(d / "26-495-0000.flac"), np.zeros(1600), 16000)  # silent
    sf.write(str(d / "26-495-0001.flac"), 0.1 * np.ones(100), 16000)  # too short for Whisper
    (root / "19" / "227" / "19-227-0001.flac").write_bytes(b"fLaC but not really" * 5)  # undecodable
    trans26, trans19 = d / "26-495.trans.txt", root / "19" / "227" / "19-227.trans.txt"
    with pytest.raises(ManifestError) as ei:
        librispeech_manifest(root, tmp_path / "m.jsonl")
    lines = str(ei.value).splitlines()[1:]
    assert len(lines) == 3 and not (tmp_path / "m.jsonl").exists()
    assert lines[0].strip().startswith(f"{trans19}:2: {root / '19' / '227' / '19-227-0001.flac'}: unreadable audio")
    assert lines[1].strip().startswith(f"{trans26}:1: {d / '26-495-0000.flac'}: silent audio")
    assert lines[2].strip().startswith(f"{trans26}:2: {d / '26-495-0001.flac'}: too short")

    assert librispeech_manifest(root, tmp_path / "m.jsonl", skip_bad=True) == 5
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{root}: skipped 3 utterance(s) with bad audio:" and [o.strip() for o in out[1:]] == [ln.strip() for ln in lines]
    assert {e.labels["id"] for e in read_manifest(tmp_path / "m.jsonl")}.isdisjoint({"26-495-0000", "26-495-0001", "19-227-0001"})
