"""Feature cache: run the frozen encoder once per clip, keep every hidden state.

Layout of one cache, `ROOT/<key>/`:
    index.json                 encoder, n_states, d_model, mode, and one row per clip
                               (shard, offset, frames, text, prompt, labels, audio path)
    shard_00000.safetensors    "states": (n_states, sum of frames, d_model) float16, clips concatenated in time

Design choices:
- The key hashes what the states depend on: each clip's audio bytes and its row, the encoder's
  weights and config, the forward mode and this format's version. Same inputs, same key: a second
  call finds `index.json` and does nothing. Change any input and a new key (a new folder) appears.
- Shards are planned up front from the manifest order and each is written atomically
  (temp file + rename), so an interrupted run re-encodes only the missing shards. A shard on disk
  is reused only if its metadata names exactly the rows planned for it (a shard written under
  another CLIPS_PER_SHARD is re-encoded, never misread). An index whose shards are gone is rebuilt.
- Audio paths are made absolute before hashing and in the index, so the key does not depend on
  how the manifest's path was spelled (or the working directory) and the rows open from anywhere.
- float16 halves the size; Whisper's states are well inside its range (checked in the tests:
  what comes out equals a direct encoder call to float16 precision).
- Loading is memory-mapped per shard (safetensors); `load_states` keeps only the layers asked for,
  so a single-layer experiment holds 1/n_states of the cache in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from omni import audio
from omni.data.manifest import Example, read_manifest

FORMAT_VERSION = 1
CLIPS_PER_SHARD = 256
MODES = ("var", "pad30")  # WhisperEncoder.forward's modes


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


def cache_key(examples: Sequence[Example], encoder_fp: str, mode: str) -> str:
    h = hashlib.sha256(f"omni-features-v{FORMAT_VERSION}|{encoder_fp}|{mode}".encode())
    for ex in examples:
        h.update(json.dumps(_row(ex), sort_keys=True).encode())
        _hash_file(ex.audio, h)
    return h.hexdigest()[:16]


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


@dataclass
class FeatureCache:
    path: Path
    index: dict

    @classmethod
    def open(cls, path: str | Path) -> "FeatureCache":
        path = Path(path)
        f = path / "index.json"
        if not f.exists():
            raise FileNotFoundError(f"{path}: not a feature cache (no index.json); build it with `omni features`")
        index = json.loads(f.read_text())
        if index.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: feature cache format {index.get('format')}, this code reads {FORMAT_VERSION}: rebuild it")
        return cls(path, index)

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
            with safe_open(self.path / f"shard_{shard:05d}.safetensors", framework="pt") as f:
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
        from omni.speech_lm import collate_states

        states = states if states is not None else self.load_states(rows, layers)
        order = sorted(range(len(rows)), key=lambda j: self.rows[rows[j]]["frames"])
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if shuffle:
            g = torch.Generator().manual_seed(seed)
            chunks = [chunks[i] for i in torch.randperm(len(chunks), generator=g).tolist()]
        for chunk in chunks:
            hidden, lengths = collate_states([states[j].float() for j in chunk])
            yield hidden, lengths, [self.rows[rows[j]] for j in chunk]


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
    """Encode every clip of a manifest once; return the cache folder (existing one if up to date)."""
    from omni.encoder import WhisperEncoder

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    m = read_manifest(manifest, skip_bad=skip_bad)
    if m.problems:
        print(f"skipped {m.n_bad} bad rows of {m.n_rows} in {manifest}")
    examples = m.examples
    if not examples:
        raise ValueError(f"{manifest}: no usable rows")
    encoder = WhisperEncoder.from_source(encoder_source, device=device)
    key = cache_key(examples, encoder_fingerprint(encoder), mode)
    path = Path(out) / key
    n_shards = math.ceil(len(examples) / CLIPS_PER_SHARD)
    if (path / "index.json").exists():
        shards = {r["shard"] for r in json.loads((path / "index.json").read_text())["rows"]}
        if all((path / f"shard_{s:05d}.safetensors").exists() for s in shards):
            return path
        (path / "index.json").unlink()  # a shard is gone: rebuild what is missing below
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(total=len(examples), desc="features", unit="clip", disable=not progress or None)
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
            tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")  # per process: concurrent builders never share a temp file
            save_file({"states": tensor}, tmp, metadata={"frames": json.dumps(frames), "rows": part_hash})
            os.replace(tmp, f)
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
        "frames_per_second": audio.SAMPLE_RATE / audio.HOP_LENGTH / 2,
        "rows": rows,
    }
    tmp = path / f"index.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, path / "index.json")  # last: its presence means the cache is complete
    return path
