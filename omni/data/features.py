"""Feature cache: run the frozen encoder once per clip, keep every hidden state.

Layout of one cache, `ROOT/<key>/`:
    index.json                 encoder, n_states, d_model, mode, and one row per clip
                               (shard, offset, frames, text, prompt, labels, audio path)
    shard_00000.safetensors    "states": (n_states, sum of frames, d_model) float16, clips concatenated in time

Design choices:
- The key hashes what the states depend on: each clip's audio bytes and its row, the encoder's
  weights and config, the forward mode and this format's version. Same inputs, same key: a second
  call finds `index.json` and does nothing. Change any input and a new key (a new folder) appears.
- Every clip is checked before anything is encoded or written: the manifest reader checks rows and
  headers (missing, undecodable, empty, too short, too long), and the pass that reads each clip's
  bytes for the key also decodes them from memory for NaN/inf and silence (omni.data.audio.check_file),
  so no file is read more often than before the checks (on the 3,300-clip default corpus the
  checks added 2.6% of the encoding time: benchmarks/bench_checks.py). Without skip_bad every problem is raised
  at once (ManifestError, `manifest:line: clip: reason`, nothing written); with skip_bad the bad
  rows are left out of the key and the cache, and every one is printed with its reason.
- A cache is built in the hidden folder `ROOT/.<key>.partial` and renamed to `ROOT/<key>` only
  when its index is written: `ROOT/<key>` is always complete. A failed build removes its partial
  folder unless it holds finished shards; a killed one leaves them there for the next run.
  Builders of one key take a lock (`ROOT/.<key>.lock`), so concurrent runs encode once; the lock
  file goes when the build ends, built or failed.
- Shards are planned up front from the manifest order and each is written atomically
  (temp file + rename), so an interrupted run re-encodes only the missing shards. A shard on disk
  is reused only if its metadata names exactly the rows planned for it (a shard written under
  another CLIPS_PER_SHARD is re-encoded, never misread). An index whose shards are gone is rebuilt,
  and so is a `ROOT/<key>` without index (left by versions that built in place).
- Audio paths are made absolute before hashing and in the index, so the key does not depend on
  how the manifest's path was spelled (or the working directory) and the rows open from anywhere.
- float16 halves the size; Whisper's states are well inside its range (checked in the tests:
  what comes out equals a direct encoder call to float16 precision).
- Loading is memory-mapped per shard (safetensors); `load_states` keeps only the layers asked for,
  so a single-layer experiment holds 1/n_states of the cache in memory.
- The index holds each shard's size and CRC-32 (`shards`): opening a cache checks every size, and the
  first read of a shard in a process checks its CRC (zlib, about 1 GB/s), so a truncated or damaged
  shard is named (`CorruptShard`, with the command that mends it) and never read as features;
  `build_features` re-encodes exactly the shards that fail, so running it again mends the cache.
  safetensors has no checksum of its own: a flipped bit in a tensor would load without a word.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save

from omni.common import DISK_FULL, atomic_save, atomic_write, disk_full, file_lock
from omni.common import progress as progress_bar  # the parameters here are called `progress`
from omni.data import audio
from omni.data.manifest import Example, Problem, read_manifest
from omni.model import mel
from omni.model.encoder import MODES, WhisperEncoder, collate_states

FORMAT_VERSION = 1
CLIPS_PER_SHARD = 256


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def encoder_fingerprint(encoder) -> str:
    """Hash of the encoder's weights: two sources with the same weights share caches."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _key_hash(encoder_fp: str, mode: str):
    return hashlib.sha256(f"omni-features-v{FORMAT_VERSION}|{encoder_fp}|{mode}".encode())


def cache_key(examples: Sequence[Example], encoder_fp: str, mode: str) -> str:
    h = _key_hash(encoder_fp, mode)
    for ex in examples:
        h.update(json.dumps(_row(ex), sort_keys=True).encode())
        _hash_file(ex.audio, h)
    return h.hexdigest()[:16]


def check_and_key(
    examples: Sequence[Example], encoder_fp: str, mode: str, progress: bool = False
) -> tuple[str, list[Example], list[Problem]]:
    """Read each clip once: decode its bytes for the content check (omni.data.audio.check_file) and hash
    the good ones. Returns (cache_key(good), good, problems), each problem `manifest:line: clip: reason`."""
    h = _key_hash(encoder_fp, mode)
    good: list[Example] = []
    problems: list[Problem] = []
    for ex in progress_bar(examples, enabled=progress, desc="checking clips", unit="clip"):
        try:
            data = ex.audio.read_bytes()
        except OSError as e:
            problems.append(Problem(ex.source, ex.line, f"{ex.audio}: unreadable ({e.strerror})"))
            continue
        reason = audio.check_file(ex.audio, data=data)
        if reason:
            problems.append(Problem(ex.source, ex.line, f"{ex.audio}: {reason}"))
            continue
        good.append(ex)
        h.update(json.dumps(_row(ex), sort_keys=True).encode())
        h.update(data)
    return h.hexdigest()[:16], good, problems


def _row(ex: Example) -> dict:
    # abspath, not resolve(): a corpus of symlinks keeps its own paths
    return {"audio": os.path.abspath(ex.audio), "text": ex.text, "prompt": ex.prompt, "labels": ex.labels}


def _rows_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(_row(ex), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _shard_frames(f: Path, rows_hash: str, n: int) -> list[int] | None:
    """Frames per clip of a shard already on disk, or None if it is not the shard planned here."""
    try:
        with safe_open(f, framework="pt") as sf:
            meta = sf.metadata() or {}
        frames = json.loads(meta["frames"])
    except Exception:  # unreadable, or written by an older version without the metadata
        return None
    return frames if meta.get("rows") == rows_hash and len(frames) == n else None


class CorruptShard(ValueError):
    """A shard whose size or CRC-32 is not what the index recorded: damaged on disk, never read."""


def shard_info(f: Path) -> dict:
    """{"bytes", "crc32"} of a shard file, as the index records it."""
    crc = 0
    with open(f, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": f.stat().st_size, "crc32": crc}


def _mend(path: Path) -> str:
    """The command that re-encodes a cache's damaged shards (build_features on its own manifest)."""
    try:
        index = json.loads((path / "index.json").read_text())
        return f"omni features --manifest {index['manifest']} --features {path.parent} --encoder {index['encoder']} --encoder-mode {index['mode']}"
    except (OSError, ValueError, KeyError):
        return "omni features with the manifest it was built from"


@dataclass
class FeatureCache:
    path: Path
    index: dict
    verified: set[int] = field(default_factory=set)  # shards whose CRC-32 this process has checked

    @classmethod
    def open(cls, path: str | Path) -> "FeatureCache":
        path = Path(path)
        f = path / "index.json"
        if not f.exists():
            raise FileNotFoundError(f"{path}: not a feature cache (no index.json); build it with `omni features`")
        index = json.loads(f.read_text())
        if index.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: feature cache format {index.get('format')}, this code reads {FORMAT_VERSION}: rebuild it")
        cache = cls(path, index)
        for shard, info in enumerate(index.get("shards", [])):  # sizes: one stat each, every open
            shard_path = cache.shard_path(shard)
            size = shard_path.stat().st_size if shard_path.exists() else -1
            if size != info["bytes"]:
                what = "missing" if size < 0 else f"{size} bytes, the index recorded {info['bytes']}"
                raise CorruptShard(f"{shard_path}: feature shard {what}; re-encode it with `{_mend(path)}`")
        return cache

    def shard_path(self, shard: int) -> Path:
        return self.path / f"shard_{shard:05d}.safetensors"

    def check_shard(self, shard: int) -> None:
        """The shard's CRC-32 against the index (once per process and shard); CorruptShard if they differ."""
        infos = self.index.get("shards")
        if shard in self.verified or not infos:  # a cache written before checksums: nothing to compare
            return
        got = shard_info(self.shard_path(shard))
        if got != infos[shard]:
            raise CorruptShard(f"{self.shard_path(shard)}: damaged feature shard (CRC-32 {got['crc32']:08x}, the index recorded "
                               f"{infos[shard]['crc32']:08x}); re-encode it with `{_mend(self.path)}`")
        self.verified.add(shard)

    @property
    def rows(self) -> list[dict]:
        return self.index["rows"]

    @property
    def n_states(self) -> int:
        return self.index["n_states"]

    @property
    def d_model(self) -> int:
        return self.index["d_model"]

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, **labels) -> list[int]:
        """Row numbers whose labels match, e.g. select(split="train")."""
        return [i for i, r in enumerate(self.rows) if all(r["labels"].get(k) == v for k, v in labels.items())]

    def load_states(self, rows: Sequence[int] | None = None, layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per clip (len(layers) or n_states, frames, d_model) float16, in the order asked."""
        rows = range(len(self)) if rows is None else rows
        by_shard: dict[int, list[int]] = {}
        for i in rows:
            by_shard.setdefault(self.rows[i]["shard"], []).append(i)
        out: dict[int, torch.Tensor] = {}
        for shard, idx in by_shard.items():
            self.check_shard(shard)
            with safe_open(self.shard_path(shard), framework="pt") as f:
                sl = f.get_slice("states")
                for i in idx:
                    r = self.rows[i]
                    t = sl[:, r["offset"] : r["offset"] + r["frames"], :]
                    out[i] = (t[list(layers)] if layers is not None else t).clone()
        return [out[i] for i in rows]

    def batches(
        self,
        rows: Sequence[int],
        batch_size: int,
        layers: Sequence[int] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        states: list[torch.Tensor] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
        """One epoch of (hidden (B, S, T, d) float32, lengths (B,), rows), batched by length.

        Clips are sorted by length and cut into batches (little padding); the batch ORDER is
        shuffled with `seed`. Pass `states` (from load_states(rows, layers)) to avoid re-reading.
        """
        states = states if states is not None else self.load_states(rows, layers)
        order = sorted(range(len(rows)), key=lambda j: self.rows[rows[j]]["frames"])
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if shuffle:
            g = torch.Generator().manual_seed(seed)
            chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]
        for chunk in chunks:
            hidden, lengths = collate_states([states[j].float() for j in chunk])
            yield hidden, lengths, [self.rows[rows[j]] for j in chunk]


def _complete(path: Path) -> bool:
    """An index whose shards are all there (and, where it records them, of the recorded size)."""
    if not (path / "index.json").exists():
        return False
    index = json.loads((path / "index.json").read_text())
    shards = {r["shard"] for r in index["rows"]}
    if not all((path / f"shard_{s:05d}.safetensors").exists() for s in shards):
        return False
    return all((path / f"shard_{s:05d}.safetensors").stat().st_size == info["bytes"] for s, info in enumerate(index.get("shards", [])))


def _damaged(path: Path) -> list[Path]:
    """The shards of a cache folder whose size or CRC-32 differ from its index's record."""
    try:
        infos = json.loads((path / "index.json").read_text()).get("shards", [])
    except (OSError, ValueError):
        return []
    files = [path / f"shard_{s:05d}.safetensors" for s in range(len(infos))]
    return [f for f, info in zip(files, infos) if f.exists() and shard_info(f) != info]


def build_features(
    manifest: str | Path,
    out: str | Path,
    encoder_source: str = "tiny.en",
    mode: str = "var",
    device: str = "cpu",
    batch_size: int = 8,
    skip_bad: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every clip of a manifest once; return the cache folder (existing one if up to date).

    Every row and clip is checked first (see the module docstring); without skip_bad any problem
    raises ManifestError listing them all, before anything is written."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    m = read_manifest(manifest, check_content=False, settle=False)  # content: below, in the key's read
    encoder = WhisperEncoder.from_source(encoder_source, device=device)
    key, examples, bad = check_and_key(m.examples, encoder_fingerprint(encoder), mode, progress)
    m.examples, m.problems = examples, sorted(m.problems + bad, key=lambda p: p.line)
    m.settle(skip_bad)
    if m.problems:
        print(m.report())
    if not examples:
        raise ValueError(f"{manifest}: no usable rows")
    path = Path(out) / key
    if _complete(path) and not _damaged(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{key}.lock"
    with file_lock(lock):
        try:
            damaged = _damaged(path) if path.exists() else []
            if _complete(path) and not damaged:  # another process finished it while we waited
                return path
            partial = path.parent / f".{key}.partial"
            partial.mkdir(exist_ok=True)
            if path.exists():  # incomplete (a shard is gone or damaged, or built in place by an older version)
                for f in damaged:
                    print(f"features: {f} is damaged (size or CRC-32 differs from the index): re-encoding it")
                    f.unlink()
                for f in path.iterdir():
                    if f.name != "index.json" and not (partial / f.name).exists():
                        os.replace(f, partial / f.name)
                shutil.rmtree(path)
            try:
                _build(examples, partial, key, m.path, encoder, encoder_source, mode, device, batch_size, progress)
                os.rename(partial, path)
            except BaseException:
                if not any(partial.glob("shard_*.safetensors")):  # nothing worth resuming from
                    shutil.rmtree(partial, ignore_errors=True)
                raise
        finally:  # built or failed, no lock file stays behind; a waiter sees it gone and locks afresh (common.file_lock)
            lock.unlink(missing_ok=True)
    return path


def _build(examples: list[Example], path: Path, key: str, manifest: Path, encoder, encoder_source: str,
           mode: str, device: str, batch_size: int, progress: bool) -> None:
    """Encode the shards missing from `path` and write its index (last)."""
    n_shards = math.ceil(len(examples) / CLIPS_PER_SHARD)
    rows, infos = [], []
    bar = progress_bar(total=len(examples), enabled=progress, desc="features", unit="clip")
    for shard in range(n_shards):
        part = examples[shard * CLIPS_PER_SHARD : (shard + 1) * CLIPS_PER_SHARD]
        f = path / f"shard_{shard:05d}.safetensors"
        part_hash = _rows_hash(part)
        # written by an interrupted earlier run: frames come from its metadata
        frames = _shard_frames(f, part_hash, len(part)) if f.exists() else None
        if frames is None:
            waves = [audio.load(ex.audio).to(device) for ex in part]
            states = encoder.encode(waves, mode=mode, batch_size=batch_size)
            frames = [s.size(1) for s in states]
            tensor = torch.cat([s.to(torch.float16).cpu() for s in states], dim=1).contiguous()
            if not torch.isfinite(tensor).all():
                bad = [ex for ex, s in zip(part, states) if not torch.isfinite(s.to(torch.float16)).all()]
                raise ValueError(f"hidden states overflow float16 for {len(bad)} clip(s), e.g. {bad[0].source}:{bad[0].line}")
            try:  # a unique temporary name: concurrent builders never share one
                blob = save({"states": tensor}, metadata={"frames": json.dumps(frames), "rows": part_hash})
                atomic_save(f, lambda tmp: tmp.write_bytes(blob))  # Python's write: a full disk is an OSError, with its errno
            except OSError as e:
                if e.errno not in DISK_FULL:
                    raise
                raise disk_full(e, f"feature shard {f}", f"The {shard} shards before it are kept: free space, then run the same "
                                "command again, which encodes only what is missing") from e
        infos.append(shard_info(f))
        offset = 0
        for ex, n in zip(part, frames):
            rows.append(_row(ex) | {"shard": shard, "offset": offset, "frames": n, "line": ex.line})
            offset += n
        bar.update(len(part))
    bar.close()
    index = {
        "format": FORMAT_VERSION,
        "key": key,
        "manifest": str(Path(manifest).resolve()),
        "encoder": encoder_source,
        "mode": mode,
        "n_states": encoder.n_states,
        "d_model": encoder.d_model,
        "frames_per_second": mel.SAMPLE_RATE / mel.HOP_LENGTH / 2,
        "rows": rows,
        "shards": infos,  # per shard {"bytes", "crc32"}: FeatureCache checks them before reading
    }
    atomic_write(path / "index.json", json.dumps(index))  # last: its presence means the cache is complete
