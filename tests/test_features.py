"""omni.data.features on a tiny synthesized corpus (22 clips, 3 shards of 8): the cache returns what
the encoder returns (to float16 precision), its key follows its inputs, a second build does nothing,
an interrupted build re-encodes only what is missing, batches are bucketed by length."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from conftest import mixed_manifest
from omni.data import audio
from omni.data import features
from omni.data.features import FeatureCache, build_features, cache_key, encoder_fingerprint
from omni.data.manifest import ManifestError, read_manifest
from omni.data.synth import SynthConfig, build_corpus
from omni.model.encoder import WhisperEncoder

SHARD = 8  # clips per shard here: 22 clips -> shards of 8, 8, 6


@pytest.fixture(scope="module")
def enc() -> WhisperEncoder:
    return WhisperEncoder.from_source("tiny.en")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("features")
    cfg = SynthConfig(out=str(root / "corpus"), sentences=20, min_words=3, max_words=10, workers=1,
                      accents=("en-us", "en-gb"), variants=("f1", "f4", "m1", "m4", "whisper", "whisperf"))
    return build_corpus(cfg)


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "CLIPS_PER_SHARD", SHARD)
        return build_features(corpus / "manifest.jsonl", tmp_path_factory.mktemp("cache"), progress=False)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def counting_encoder(monkeypatch) -> list[int]:
    """The encoder, counting the clips of every call (the list it returns), with SHARD clips per shard."""
    encoded: list[int] = []
    real = WhisperEncoder.encode
    monkeypatch.setattr(WhisperEncoder, "encode", lambda self, waves, **k: encoded.append(len(waves)) or real(self, waves, **k))
    monkeypatch.setattr(features, "CLIPS_PER_SHARD", SHARD)
    return encoded


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_round_trip_equals_a_direct_encoder_call(built, enc):
    cache = FeatureCache.open(built)
    assert len(cache) == 22 and (cache.n_states, cache.d_model) == (enc.n_states, enc.d_model)
    assert sorted(p.name for p in built.glob("shard_*")) == [f"shard_{i:05d}.safetensors" for i in range(3)]
    states = cache.load_states()
    direct = enc.encode([audio.load(r["audio"]) for r in cache.rows], batch_size=4)  # another batching
    for s, d, r in zip(states, direct, cache.rows):
        assert s.dtype == torch.float16 and s.shape == d.shape == (enc.n_states, r["frames"], enc.d_model)
        # float16 keeps 11 significant bits: relative error <= 2**-11, plus float32 batching noise
        torch.testing.assert_close(s.float(), d, rtol=1e-3, atol=1e-3)
    # layers and row order as asked; a subset holds only the layers asked for
    rows = [21, 3, 9]
    part = cache.load_states(rows, layers=[0, -1])
    for i, p in zip(rows, part):
        assert p.shape[0] == 2 and torch.equal(p, states[i][[0, -1]])


def test_second_build_does_nothing(built, corpus, monkeypatch):
    before = _mtimes(built)

    def no_encoding(*a, **k):
        raise AssertionError("the encoder ran on an up-to-date cache")

    monkeypatch.setattr(WhisperEncoder, "encode", no_encoding)
    monkeypatch.setattr(features, "CLIPS_PER_SHARD", SHARD)
    assert build_features(corpus / "manifest.jsonl", built.parent, progress=False) == built
    # the same manifest named by a relative path (another spelling, another cwd): same key
    monkeypatch.chdir(corpus.parent)
    assert build_features(Path(corpus.name) / "manifest.jsonl", built.parent, progress=False) == built
    assert _mtimes(built) == before
    assert all(Path(r["audio"]).is_absolute() for r in FeatureCache.open(built).rows)


def test_interrupted_build_reencodes_only_the_missing_shard(built, corpus, tmp_path, monkeypatch):
    copy = tmp_path / built.name
    shutil.copytree(built, copy)
    (copy / "index.json").unlink()
    (copy / "shard_00001.safetensors").unlink()  # killed while encoding shard 1 of 3
    before = _mtimes(copy)
    encoded = counting_encoder(monkeypatch)
    assert build_features(corpus / "manifest.jsonl", tmp_path, progress=False) == copy
    assert encoded == [SHARD]
    after = _mtimes(copy)
    assert after["shard_00000.safetensors"] == before["shard_00000.safetensors"]
    assert after["shard_00002.safetensors"] == before["shard_00002.safetensors"]
    again, first = json.loads((copy / "index.json").read_text()), json.loads((built / "index.json").read_text())
    # the same index; shard 1's checksum may differ, as its float16 states may differ in the last bit between two encodings
    assert {k: v for k, v in again.items() if k != "shards"} == {k: v for k, v in first.items() if k != "shards"}
    assert [s["bytes"] for s in again["shards"]] == [s["bytes"] for s in first["shards"]] and again["shards"][0] == first["shards"][0]

    # an index whose shard was deleted: rebuilt, again only that shard
    (copy / "shard_00002.safetensors").unlink()
    assert build_features(corpus / "manifest.jsonl", tmp_path, progress=False) == copy
    assert encoded == [SHARD, 22 - 2 * SHARD] and len(FeatureCache.open(copy).load_states()) == 22

    # shards left by a run with another shard size are re-encoded, never misread
    (copy / "index.json").unlink()
    monkeypatch.setattr(features, "CLIPS_PER_SHARD", 11)
    encoded.clear()
    build_features(corpus / "manifest.jsonl", tmp_path, progress=False)
    assert encoded == [11, 11]
    a, b = FeatureCache.open(copy), FeatureCache.open(built)
    for s, t in zip(a.load_states(), b.load_states()):
        torch.testing.assert_close(s.float(), t.float(), rtol=1e-3, atol=1e-3)


def test_a_damaged_shard_is_named_never_read_and_the_same_build_mends_only_it(built, corpus, tmp_path, monkeypatch):
    copy = tmp_path / built.name
    shutil.copytree(built, copy)
    shard = copy / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x40  # one flipped bit inside the tensor data: safetensors alone would load it silently
    shard.write_bytes(bytes(data))
    cache = FeatureCache.open(copy)  # sizes agree: opening is cheap and fine
    first = cache.load_states(list(range(SHARD)))  # shard 0 reads (and is checked)
    with pytest.raises(features.CorruptShard, match=r"shard_00001.safetensors: damaged feature shard .*omni features --manifest"):
        cache.load_states([SHARD])
    assert cache.verified == {0}
    # re-running the build re-encodes exactly that shard, and the cache reads again
    encoded = counting_encoder(monkeypatch)
    assert build_features(corpus / "manifest.jsonl", tmp_path, progress=False) == copy
    assert encoded == [SHARD]
    states = FeatureCache.open(copy).load_states()
    assert all(torch.equal(a, b) for a, b in zip(states[:SHARD], first)) and len(states) == 22
    # a truncated shard is refused when the cache is opened, naming it and the size
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(features.CorruptShard, match=r"shard_00001.safetensors: feature shard 1000 bytes, the index recorded"):
        FeatureCache.open(copy)


def test_key_follows_rows_audio_encoder_and_mode(corpus, enc, tmp_path):
    m = read_manifest(corpus / "manifest.jsonl")
    ex = m.examples[:4]
    fp = encoder_fingerprint(enc)
    key = cache_key(ex, fp, "var")
    assert cache_key(ex, fp, "var") == key  # deterministic
    assert cache_key(ex, fp, "pad30") != key
    assert cache_key(ex, "another-encoder", "var") != key
    assert cache_key(ex[:3], fp, "var") != key
    assert cache_key(ex[::-1], fp, "var") != key  # order = shard layout

    # a changed row (text, label) and a changed audio file: new keys, end to end
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()[:4]]
    for r in rows:
        r["audio"] = str(corpus / r["audio"])
    clip = tmp_path / "clip.wav"
    shutil.copy(rows[0]["audio"], clip)
    rows[0]["audio"] = str(clip)
    man = _write(tmp_path / "m.jsonl", [json.dumps(r) for r in rows])
    first = build_features(man, tmp_path / "cache", progress=False)
    assert build_features(man, tmp_path / "cache", progress=False) == first
    rows[1]["text"] += " again"
    changed_row = build_features(_write(man, [json.dumps(r) for r in rows]), tmp_path / "cache", progress=False)
    w = audio.load(clip)
    audio.save(clip, w * 0.5)
    changed_audio = build_features(man, tmp_path / "cache", progress=False)
    assert len({first, changed_row, changed_audio}) == 3
    c = FeatureCache.open(changed_audio)
    assert c.rows[1]["text"].endswith(" again") and c.index["mode"] == "var"

    # another mode: another key, and pad30 states also round-trip (2 clips: pad30 encodes 30 s each)
    man2 = _write(tmp_path / "m2.jsonl", [json.dumps(r) for r in rows[:2]])
    var = build_features(man2, tmp_path / "cache", progress=False)
    pad30 = build_features(man2, tmp_path / "cache", mode="pad30", progress=False)
    assert pad30 != var and FeatureCache.open(pad30).index["mode"] == "pad30"
    direct = enc.encode([audio.load(r["audio"]) for r in rows[:2]], mode="pad30")
    for s, d in zip(FeatureCache.open(pad30).load_states(), direct):
        torch.testing.assert_close(s.float(), d, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="mode must be one of"):
        build_features(man, tmp_path / "nothing", mode="pad60", progress=False)
    assert not (tmp_path / "nothing").exists()


def _padding(lengths_per_batch: list[list[int]]) -> float:
    padded = sum(len(b) * max(b) for b in lengths_per_batch)
    return 1 - sum(map(sum, lengths_per_batch)) / padded


def test_batches_are_bucketed_by_length_and_select_works(built):
    cache = FeatureCache.open(built)
    train = cache.select(split="train")
    assert train and all(cache.rows[i]["labels"]["split"] == "train" for i in train)
    splits = {r["labels"]["split"] for r in cache.rows}
    assert splits == {"train", "val", "test", "test_seen_voice"}
    assert sorted(i for s in splits for i in cache.select(split=s)) == list(range(len(cache)))
    assert cache.select(split="test", gender="nobody") == [] and cache.select() == list(range(len(cache)))

    states = cache.load_states(train, layers=[-1])
    seen, lengths = [], []
    for hidden, ln, rows in cache.batches(train, 4, layers=[-1], seed=1):
        assert hidden.dtype == torch.float32 and hidden.shape[:2] == (len(rows), 1) and hidden.shape[2] == int(ln.max())
        assert ln.tolist() == [r["frames"] for r in rows]
        for j, r in enumerate(rows):
            i = train.index(next(k for k in train if cache.rows[k] is r))
            seen.append(i)
            assert torch.equal(hidden[j, :, : ln[j]], states[i].float()) and not hidden[j, :, ln[j] :].any()
        lengths.append(ln.tolist())
    assert sorted(seen) == list(range(len(train)))  # one epoch: every row once
    again = [[r["frames"] for r in rows] for _, _, rows in cache.batches(train, 4, layers=[-1], seed=1, states=states)]
    assert again == lengths  # the seed fixes the order; passing states changes nothing

    frames = [cache.rows[i]["frames"] for i in train]
    rng = random.Random(0)
    rand = []
    for _ in range(200):
        f = rng.sample(frames, len(frames))
        rand.append(_padding([f[i : i + 4] for i in range(0, len(f), 4)]))
    bucketed, random_mean = _padding(lengths), sum(rand) / len(rand)
    print(f"\npadding fraction, batch 4 of {len(train)} clips: bucketed {bucketed:.3f}, random batching {random_mean:.3f}")
    assert bucketed < 0.5 * random_mean


def test_bad_rows_name_file_and_line_or_are_skipped_and_counted(corpus, tmp_path, capsys):
    good = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()[:3]]
    for r in good:
        r["audio"] = str(corpus / r["audio"])
    lines = [json.dumps(good[0]), "{not json", json.dumps(good[1]),
             json.dumps({"audio": "missing.wav", "text": "gone"}), json.dumps(good[2]), json.dumps({"prompt": "two problems, one row"})]
    man = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ManifestError) as e:
        build_features(man, tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert f"{man}:2: invalid JSON" in msg and f"{man}:6: missing 'audio'" in msg
    assert any(ln.strip().startswith(f"{man}:4: ") and ln.endswith("missing.wav: audio file not found") for ln in msg.splitlines())
    assert not (tmp_path / "cache").exists()

    with pytest.warns(UserWarning, match="skipped 3 bad rows"):
        path = build_features(man, tmp_path / "cache", skip_bad=True, progress=False)
    assert f"{man}: 6 rows, 3 ok, skipped 3 bad rows" in capsys.readouterr().out
    cache = FeatureCache.open(path)
    assert [r["line"] for r in cache.rows] == [1, 3, 5] and [r["text"] for r in cache.rows] == [g["text"] for g in good]

    _write(man, ["{not json", json.dumps({"audio": "missing.wav", "text": "gone"})])
    with pytest.raises(ValueError, match="no usable rows"), pytest.warns(UserWarning):
        build_features(man, tmp_path / "cache", skip_bad=True, progress=False)


def test_open_refuses_what_is_not_a_cache(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="not a feature cache"):
        FeatureCache.open(tmp_path)
    index = json.loads((built / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps(index | {"format": 0}))
    with pytest.raises(ValueError, match="format 0"):
        FeatureCache.open(tmp_path)


def _good_rows(corpus: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()[:n]]
    return [r | {"audio": str(corpus / r["audio"])} for r in rows]


def test_bad_clips_are_all_named_before_work_or_skipped_and_listed(corpus, tmp_path, monkeypatch, capsys):
    """A silent, dither-only, NaN, too short, too long, empty, undecodable and missing clip between
    good ones: without skip_bad every one is named (manifest:line: clip: reason), nothing is encoded
    and nothing written; with skip_bad the good ones are cached and every skipped row is listed."""
    man, expected = mixed_manifest(tmp_path / "m.jsonl", _good_rows(corpus, 4))
    real = WhisperEncoder.encode
    encoded = []
    monkeypatch.setattr(WhisperEncoder, "encode", lambda self, waves, **k: encoded.append(len(waves)) or real(self, waves, **k))
    with pytest.raises(ManifestError) as e:
        build_features(man, tmp_path / "cache", progress=False)
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 9 and encoded == [] and not (tmp_path / "cache").exists()
    for (line, reason), text in zip(sorted(expected.items()), lines):
        assert text.strip().startswith(f"{man}:{line}: {tmp_path / 'bad'}") and reason in text, (line, text)

    with pytest.warns(UserWarning, match="skipped 9 bad rows"):
        path = build_features(man, tmp_path / "cache", skip_bad=True, progress=False)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{man}: 13 rows, 4 ok, skipped 9 bad rows"
    assert all(f"{man}:{line}: " in o and reason in o for (line, reason), o in zip(sorted(expected.items()), out[1:9]))
    cache = FeatureCache.open(path)
    good_lines = sorted(set(range(1, 13)) - set(expected))
    assert [r["line"] for r in cache.rows] == good_lines and encoded == [4]
    assert len(cache.load_states()) == 4 and os.listdir(tmp_path / "cache") == [path.name]  # no partial, no lock


def test_a_build_failing_midway_leaves_no_half_cache_nor_its_lock_and_the_rerun_resumes(corpus, tmp_path, monkeypatch):
    man = _write(tmp_path / "m.jsonl", [json.dumps(r) for r in _good_rows(corpus, 6)])  # 3 shards of 2
    monkeypatch.setattr(features, "CLIPS_PER_SHARD", 2)
    real = WhisperEncoder.encode
    calls = []

    def fail_at(n):
        def encode(self, waves, **k):
            calls.append(len(waves))
            if len(calls) == n:
                raise RuntimeError("out of memory (simulated)")
            return real(self, waves, **k)
        return encode

    out = tmp_path / "cache"
    monkeypatch.setattr(WhisperEncoder, "encode", fail_at(1))  # fails on the first shard: nothing to keep
    with pytest.raises(RuntimeError, match="simulated"):
        build_features(man, out, progress=False)
    assert list(out.iterdir()) == []  # no cache folder, empty or not, and no lock file left behind

    calls.clear()
    monkeypatch.setattr(WhisperEncoder, "encode", fail_at(2))  # fails on the second shard
    with pytest.raises(RuntimeError, match="simulated"):
        build_features(man, out, progress=False)
    (partial,) = out.iterdir()  # only what the rerun resumes from: no half cache where a cache is looked for, no lock
    key = partial.name[1 : -len(".partial")]
    assert partial.name == f".{key}.partial" and not (out / key).exists()
    assert sorted(p.name for p in partial.iterdir()) == ["shard_00000.safetensors"]

    calls.clear()
    monkeypatch.setattr(WhisperEncoder, "encode", fail_at(0))  # never fails: the rerun resumes
    assert build_features(man, out, progress=False) == out / key
    assert calls == [2, 2] and sorted(p.name for p in out.iterdir()) == [key]
    cache = FeatureCache.open(out / key)
    assert [r["line"] for r in cache.rows] == list(range(1, 7)) and len(cache.load_states()) == 6


KILL = """
import os, signal, sys
from omni.data import features
from omni.model.encoder import WhisperEncoder
features.CLIPS_PER_SHARD = 2
real = WhisperEncoder.encode
calls = []
def encode(self, waves, **k):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while encoding the second shard
    return real(self, waves, **k)
WhisperEncoder.encode = encode
features.build_features(sys.argv[1], sys.argv[2], progress=False)
"""


def test_a_killed_build_leaves_no_half_cache(corpus, tmp_path, monkeypatch):
    import subprocess
    import sys

    man = _write(tmp_path / "m.jsonl", [json.dumps(r) for r in _good_rows(corpus, 4)])  # 2 shards of 2
    out = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", KILL, str(man), str(out)])
    assert proc.returncode == -9
    visible = [p for p in out.iterdir() if not p.name.startswith(".")]
    (partial,) = out.glob(".*.partial")
    assert visible == [] and sorted(p.name for p in partial.iterdir()) == ["shard_00000.safetensors"]
    assert len(list(out.glob(".*.lock"))) == 1  # kill -9 left its lock file behind: stale, held by no one
    monkeypatch.setattr(features, "CLIPS_PER_SHARD", 2)
    path = build_features(man, out, progress=False)  # the stale lock does not block the rerun, which resumes
    assert path.name == partial.name[1 : -len(".partial")] and len(FeatureCache.open(path).load_states()) == 4
    assert not list(out.glob(".*.lock")) and not list(out.glob(".*.partial"))


def test_concurrent_builders_of_one_key_encode_once(corpus, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    man = _write(tmp_path / "m.jsonl", [json.dumps(r) for r in _good_rows(corpus, 4)])
    monkeypatch.setattr(features, "CLIPS_PER_SHARD", 2)
    real = WhisperEncoder.encode
    encoded = []
    monkeypatch.setattr(WhisperEncoder, "encode", lambda self, waves, **k: encoded.append(len(waves)) or real(self, waves, **k))
    with ThreadPoolExecutor(2) as pool:  # flock: two open files conflict even within one process
        paths = list(pool.map(lambda _: build_features(man, tmp_path / "cache", progress=False), range(2)))
    assert paths[0] == paths[1] and encoded == [2, 2]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [paths[0].name]
