"""Small helpers that several modules need: one way each to write a file atomically, to hold a file
lock, to shuffle audio away from its text (the control), and to limit torch's threads.

Design choices:
- atomic writes go to a uniquely named temporary file in the same folder, then `os.replace`: a reader
  sees the old file or the new one, never half of one, and two writers never share a temporary name.
- locks are advisory `fcntl.flock` on a lock file: enough for processes of one machine sharing a cache.
- the shuffled-audio control is a seeded *derangement*: with two or more items, none keeps its own
  audio, so a control can never score by accident on the clip it was given back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no room left: the disk, a file-size limit, a quota


def disk_full(e: OSError, what: str, after: str) -> OSError:
    """A clear error for a write that found no room (e.errno in DISK_FULL): what could not be written,
    why, and what is still good (`after`)."""
    return OSError(e.errno, f"{what} could not be written: {e.strerror} ({e.filename or 'disk'}). {after}")


def atomic_save(path: str | Path, save: Callable[[Path], None]) -> Path:
    """`save(tmp)` writes the file (safetensors, wav, ...); it lands at `path` only if that succeeds."""
    with atomic_path(path) as tmp:
        save(tmp)
    return Path(path)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing), released on exit. The holder may
    delete the lock file (`path.unlink()` inside the block): a process that was waiting on it then
    finds the file gone or replaced and locks the new one, so two holders never overlap."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:  # deleted by the holder we waited for
                same = False
            if not same:
                fcntl.flock(f, fcntl.LOCK_UN)
                continue
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
            return


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation in which no index maps to itself (n >= 2): item i gets item out[i]'s audio.
    One cycle through a random order; n = 1 returns [0] (nothing else to give)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    out = list(range(n))
    for i, p in enumerate(order):
        out[p] = order[(i + 1) % n]
    return out


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm bar for long work: a widget in Jupyter (ipywidgets), text on a terminal. Every progress
    bar of omni is made here, so one switch turns them all off: TQDM_DISABLE (tqdm's own variable, which
    also quiets the bars of libraries that leave `disable` alone). `omni run` sets it, since a report is
    read after the fact and each update of a bar would be a line of it. Off also when not `enabled`."""
    from tqdm.auto import tqdm

    off = not enabled or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return tqdm(iterable, disable=True if off else None, **kwargs)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch threads (e.g. many small probes in parallel workers)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
