import json
import warnings

import numpy as np
import pytest
import soundfile as sf

from conftest import mixed_manifest
from omni.data.manifest import ManifestError, read_manifest, write_manifest


def _wav(path, seconds=0.5, sr=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), 0.1 * np.sin(np.arange(int(seconds * sr)) / 5.0), sr, subtype="PCM_16")
    return path


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_flat_rows_relative_and_absolute(tmp_path):
    _wav(tmp_path / "clips" / "a.wav", 0.5)
    b = _wav(tmp_path / "elsewhere" / "b.wav", 1.0)
    m = read_manifest(
        _write(
            tmp_path / "m.jsonl",
            [
                {"audio": "clips/a.wav", "text": " hello there ", "speaker": "s1", "gender": "female"},
                "",
                {"audio": str(b), "text": "bye", "prompt": "Transcribe."},
            ],
        )
    )
    assert len(m) == 2 and m.n_rows == 2 and not m.problems
    a, e = m
    assert a.audio == tmp_path / "clips" / "a.wav" and a.text == "hello there" and a.prompt is None
    assert a.labels == {"speaker": "s1", "gender": "female"} and a.line == 1 and a.source == tmp_path / "m.jsonl"
    assert a.duration == pytest.approx(0.5)
    assert e.audio == b and e.prompt == "Transcribe." and e.line == 3 and e.duration == pytest.approx(1.0)


def test_conversation_rows(tmp_path):
    _wav(tmp_path / "x.wav")
    _wav(tmp_path / "y.wav")
    conv = {
        "id": "c1",
        "conversations": [
            {"from": "system", "value": "You listen."},
            {"from": "human", "value": "<audio>x.wav</audio> What is said?"},
            {"from": "gpt", "value": "Hello."},
            {"from": "user", "value": "Audio 2: <audio>y.wav</audio>\nAnd here?"},
            {"from": "assistant", "value": "Goodbye."},
        ],
    }
    only_tag = {"conversations": [{"from": "user", "value": "<audio>x.wav</audio>"}, {"from": "assistant", "value": "hi"}]}
    m = read_manifest(_write(tmp_path / "c.jsonl", [conv, only_tag]))
    ex = m[0]
    assert ex.text == "Goodbye." and ex.prompt == "Audio 2: And here?" and ex.labels == {"id": "c1"}
    assert ex.audio == tmp_path / "x.wav" and ex.audios == (tmp_path / "x.wav", tmp_path / "y.wav")
    assert [t.role for t in ex.turns] == ["system", "human", "gpt", "user", "assistant"]
    assert ex.turns[1].text == "What is said?" and ex.turns[1].audio == (tmp_path / "x.wav",)
    assert m[1].prompt is None and m[1].text == "hi"


def test_all_problems_collected_with_file_and_line(tmp_path):
    _wav(tmp_path / "ok.wav", 0.5)
    _wav(tmp_path / "long.wav", 3.0)
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all" * 10)
    lines = [
        {"audio": "ok.wav", "text": "fine"},  # 1
        "{not json",  # 2
        "[1, 2]",  # 3
        {"text": "no audio"},  # 4
        {"audio": "ok.wav", "text": "   "},  # 5
        {"audio": "missing.wav", "text": "x"},  # 6
        {"audio": "junk.wav", "text": "x"},  # 7
        {"audio": "long.wav", "text": "x"},  # 8
        {"audio": "", "text": "x"},  # 9
        {"conversations": [{"from": "user", "value": "no tag"}, {"from": "assistant", "value": "a"}]},  # 10
        {"conversations": [{"from": "user", "value": "<audio>ok.wav</audio>"}, {"from": "user", "value": "q"}]},  # 11
        {"conversations": [{"from": "robot", "value": "<audio>ok.wav</audio>"}, {"from": "assistant", "value": "a"}]},  # 12
    ]
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ManifestError) as ei:
        read_manifest(path, max_seconds=2.0)
    msg = str(ei.value)
    expected = {
        2: "invalid JSON",
        3: "expected a JSON object",
        4: "missing 'audio'",
        5: "'text' must be a non-empty string",
        6: "audio file not found",
        7: "unreadable audio",
        8: "longer than max_seconds=2",
        9: "'audio' must be a non-empty string",
        10: "no <audio>path</audio> tag",
        11: "last turn must be the assistant's answer",
        12: "unknown role 'robot'",
    }
    for line, text in expected.items():
        assert any(ln.strip().startswith(f"{path}:{line}: ") and text in ln for ln in msg.splitlines()), (line, msg)
    assert f"{path}:1:" not in msg
    assert {p.line for p in ei.value.problems} == set(expected)

    with pytest.warns(UserWarning, match="skipped 11 bad rows"):
        m = read_manifest(path, max_seconds=2.0, skip_bad=True)
    assert [e.line for e in m] == [1] and m.n_bad == 11 and m.n_rows == 12
    # without the audio check only the shape problems remain
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = read_manifest(path, check_audio=False, skip_bad=True)
    assert [e.line for e in m] == [1, 6, 7, 8] and m[0].duration is None


def test_error_message_lists_every_problem_one_line_each(tmp_path):
    path = _write(tmp_path / "m.jsonl", ["{bad"] * 25)
    with pytest.raises(ManifestError) as ei:
        read_manifest(path)
    lines = str(ei.value).splitlines()[1:]
    assert len(ei.value.problems) == 25 and [ln.strip().split(": ")[0] for ln in lines] == [f"{path}:{i}" for i in range(1, 26)]


def test_content_checks_name_every_bad_clip_before_any_work(tmp_path):
    good = [{"audio": str(_wav(tmp_path / f"g{i}.wav")), "text": f"good {i}"} for i in range(3)]
    path, expected = mixed_manifest(tmp_path / "m.jsonl", good)
    with pytest.raises(ManifestError) as ei:
        read_manifest(path)
    lines = str(ei.value).splitlines()[1:]
    assert len(lines) == len(expected) == 9  # every bad kind, one line each
    for (line, reason), text in zip(sorted(expected.items()), lines):
        assert text.strip().startswith(f"{path}:{line}: {tmp_path / 'bad'}") and reason in text, (line, text)

    with pytest.warns(UserWarning, match="skipped 9 bad rows"):
        m = read_manifest(path, skip_bad=True)
    assert [e.text for e in m] == ["good 0", "good 1", "good 2"] and m.n_bad == 9
    report = m.report().splitlines()
    assert report[0] == f"{path}: 12 rows, 3 ok, skipped 9 bad rows" and len(report) == 10
    assert all(f"{path}:{line}: " in r and reason in r for (line, reason), r in zip(sorted(expected.items()), report[1:]))
    # header-only reading still sees length, format and emptiness, not NaN or silence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = read_manifest(path, skip_bad=True, check_content=False)
    assert sorted(e.audio.stem for e in m if e.text.startswith("bad")) == ["dither", "nan", "silent"]


def test_empty_and_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(_write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")


def test_write_then_read_round_trip(tmp_path, monkeypatch):
    a = _wav(tmp_path / "corpus" / "wavs" / "a.wav")
    outside = _wav(tmp_path / "other" / "b.wav")
    monkeypatch.chdir(tmp_path)
    rows = [
        {"audio": a, "text": "one", "split": "train"},
        {"audio": "other/b.wav", "text": "two"},  # relative to the current directory
        {"conversations": [{"from": "user", "value": f"<audio>{a}</audio> Q?"}, {"from": "assistant", "value": "A."}]},
    ]
    path = write_manifest(tmp_path / "corpus" / "manifest.jsonl", rows)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert raw[0]["audio"] == "wavs/a.wav" and raw[0]["split"] == "train"
    assert raw[1]["audio"] == str(outside.resolve())
    assert raw[2]["conversations"][0]["value"] == "<audio>wavs/a.wav</audio> Q?"
    m = read_manifest(path)
    assert [e.audio.resolve() for e in m] == [a.resolve(), outside.resolve(), a.resolve()]
    assert not (tmp_path / "corpus" / "manifest.jsonl.tmp").exists()
    with pytest.raises(ValueError, match="row 0 has neither"):
        write_manifest(tmp_path / "x.jsonl", [{"text": "no audio"}])


def test_a_manifest_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Windows editors save UTF-8 with a BOM (encoding='utf-8-sig'); the rows are the same, and a BOM
    anywhere but the start is still an error on its line."""
    _wav(tmp_path / "a.wav")
    rows = [{"audio": "a.wav", "text": "héllo"}, {"audio": "a.wav", "text": "two"}]
    plain = _write(tmp_path / "plain.jsonl", rows)
    bom = tmp_path / "bom.jsonl"
    bom.write_text(plain.read_text(encoding="utf-8"), encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert [(e.text, e.line) for e in read_manifest(bom)] == [(e.text, e.line) for e in read_manifest(plain)] == [("héllo", 1), ("two", 2)]
    inner = tmp_path / "inner.jsonl"
    inner.write_bytes(plain.read_bytes() + b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")
    with pytest.raises(ManifestError, match=r"inner.jsonl:3: invalid JSON"):
        read_manifest(inner)
