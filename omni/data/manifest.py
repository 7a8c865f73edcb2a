"""JSONL manifests: one clip (or one conversation about clips) per line, checked before any work.

Two row shapes, both one JSON object per line:
- flat:  {"audio": "clips/a.wav", "text": "the transcript", "prompt": "optional question", ...labels}
- conversation (LLaVA / Qwen-Audio style):
  {"conversations": [{"from": "user", "value": "<audio>clips/a.wav</audio> What is said?"},
                     {"from": "assistant", "value": "the answer"}], ...labels}
  Roles: user/human, assistant/gpt, system. The audio tags are taken out of the user text. It maps
  onto the same Example as a flat row: text = the last assistant answer, prompt = the user text of
  the turn before it (None if that is only the tag), audio = the first clip; all turns are kept.

Design choices:
- Relative audio paths are relative to the manifest's folder, so a corpus folder can be moved or
  copied whole; absolute paths are allowed (a manifest beside data that lives elsewhere).
- Validation happens before any work: every line is checked (JSON, shape, fields) and every clip
  with omni.data.audio: from its header (exists, readable, not empty, not too short for Whisper's conv
  stack, not over max_seconds) and, with check_content (default), from its samples (decodes, no
  NaN/inf, not silent). All problems are collected, so a user fixes a file in one pass instead of
  one crash per bad line, and a clip that would stop an encoding job midway is found up front.
  A clip's problem reads `manifest:line: clip: reason`.
- Default is strict: any problem raises ManifestError listing every one, one line each. With
  skip_bad=True the good rows are kept and the problems returned, and a warning is always issued:
  a skipped row is never silent; `Manifest.report()` lists every skipped row with its reason.
- Every key other than audio/text/prompt (flat) or conversations (conversation) is a label, kept as
  read: probes and reports group by them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from omni.common import atomic_write
from omni.data import audio

USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "gpt"}
ROLES = USER_ROLES | ASSISTANT_ROLES | {"system"}
AUDIO_TAG = re.compile(r"<audio>(.*?)</audio>", re.S)
FLAT_KEYS = ("audio", "text", "prompt")


@dataclass
class Turn:
    role: str  # as written in the file ("user", "human", "assistant", "gpt", "system")
    text: str  # the value with <audio> tags removed, whitespace normalised
    audio: tuple[Path, ...] = ()  # resolved paths of the clips tagged in this turn
    segments: tuple[str | Path, ...] = ()  # text and clips (resolved paths) in the order written: where each clip stands


@dataclass
class Example:
    audio: Path  # resolved path of the (first) clip
    text: str  # transcript (flat) or the answer (conversation)
    prompt: str | None  # instruction / question, if any
    labels: dict  # every other key of the row
    line: int  # 1-based line number in the manifest
    source: Path  # the manifest file
    duration: float | None = None  # seconds, from the file header (None when not checked)
    audios: tuple[Path, ...] = ()  # every clip of the row (one for flat rows)
    turns: list[Turn] | None = None  # conversation rows only

    def __post_init__(self) -> None:
        if not self.audios:
            self.audios = (self.audio,)


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int  # 0: the file as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass
class Manifest:
    path: Path
    examples: list[Example]
    problems: list[Problem] = field(default_factory=list)
    n_rows: int = 0  # non-blank lines read

    @property
    def n_ok(self) -> int:
        return len(self.examples)

    @property
    def n_bad(self) -> int:
        return len({p.line for p in self.problems if p.line > 0})

    def summary(self) -> str:
        s = f"{self.path}: {self.n_rows} rows, {self.n_ok} ok"
        return s + (f", skipped {self.n_bad} bad rows" if self.problems else "")

    def settle(self, skip_bad: bool, stacklevel: int = 2) -> "Manifest":
        """Raise ManifestError listing every problem, or (skip_bad) warn that rows were skipped."""
        if self.problems and not skip_bad:
            raise ManifestError(self.path, self.problems)
        if self.problems:
            shown = "\n".join(f"  {p}" for p in self.problems[:5])
            more = f"\n  ... and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
            warnings.warn(f"{self.summary()}:\n{shown}{more}", stacklevel=stacklevel + 1)
        return self

    def report(self) -> str:
        """summary() and then every problem, one `file:line: message` line each."""
        return "\n".join([self.summary(), *(f"  {p}" for p in self.problems)])

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class ManifestError(ValueError):
    """One or more bad rows (or corpus files); .problems and the message have them all, one line each."""

    def __init__(self, path: Path, problems: list[Problem]):
        self.path, self.problems = path, problems
        listed = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s), nothing done:\n{listed}")


# --- reading ------------------------------------------------------------------------------------


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def _nonempty_str(row: dict, key: str) -> str | None:
    v = row.get(key)
    return v.strip() if isinstance(v, str) and v.strip() else None


def _parse_flat(row: dict, base: Path) -> tuple[dict, list[str]]:
    errs = []
    audio, text = _nonempty_str(row, "audio"), _nonempty_str(row, "text")
    if "audio" not in row:
        errs.append("missing 'audio'")
    elif audio is None:
        errs.append(f"'audio' must be a non-empty string, got {row['audio']!r}")
    if "text" not in row:
        errs.append("missing 'text'")
    elif text is None:
        errs.append(f"'text' must be a non-empty string, got {row['text']!r}")
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        errs.append(f"'prompt' must be a string, got {type(prompt).__name__}")
    if errs:
        return {}, errs
    labels = {k: v for k, v in row.items() if k not in FLAT_KEYS}
    prompt = (prompt.strip() or None) if isinstance(prompt, str) else None
    return dict(audios=(_resolve(base, audio),), text=text, prompt=prompt, labels=labels, turns=None), []


def _parse_conversation(row: dict, base: Path) -> tuple[dict, list[str]]:
    conv = row["conversations"]
    if not isinstance(conv, list) or len(conv) < 2:
        return {}, ["'conversations' must be a list of at least 2 turns (user, assistant)"]
    turns, errs = [], []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            errs.append(f"turn {i}: expected {{\"from\": str, \"value\": str}}, got {json.dumps(t)[:80]}")
            continue
        role = t["from"].strip().lower()
        if role not in ROLES:
            errs.append(f"turn {i}: unknown role {t['from']!r} (use one of {', '.join(sorted(ROLES))})")
            continue
        paths = [p.strip() for p in AUDIO_TAG.findall(t["value"])]
        if any(not p for p in paths):
            errs.append(f"turn {i}: empty <audio></audio> tag")
        if paths and role not in USER_ROLES:
            errs.append(f"turn {i}: <audio> tag in a {role!r} turn (only user turns carry audio)")
        text = " ".join(AUDIO_TAG.sub(" ", t["value"]).split())
        if "<audio>" in text or "</audio>" in text:
            errs.append(f"turn {i}: unbalanced <audio> tag")
        turns.append(Turn(role=role, text=text, audio=tuple(_resolve(base, p) for p in paths if p),
                          segments=segments(t["value"], base)))
    if errs:
        return {}, errs
    audios = tuple(p for t in turns for p in t.audio)
    if not audios:
        errs.append("no <audio>path</audio> tag in any user turn")
    if turns[-1].role not in ASSISTANT_ROLES:
        errs.append(f"last turn must be the assistant's answer, got role {turns[-1].role!r}")
    elif not turns[-1].text:
        errs.append("empty answer (last assistant turn)")
    if not any(t.role in USER_ROLES for t in turns):
        errs.append("no user turn")
    if errs:
        return {}, errs
    before = [t for t in turns[:-1] if t.role in USER_ROLES]
    prompt = (before[-1].text or None) if before else None
    labels = {k: v for k, v in row.items() if k != "conversations"}
    return dict(audios=audios, text=turns[-1].text, prompt=prompt, labels=labels, turns=turns), []


def segments(value: str, base: Path) -> tuple[str | Path, ...]:
    """A turn's value as text and clip paths in the order written ("Listen: <audio>a.wav</audio> and
    say" -> ("Listen:", base/a.wav, "and say")): a question written audio-last stays audio-last."""
    parts = AUDIO_TAG.split(value)  # text, path, text, path, ..., text
    out: list[str | Path] = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(_resolve(base, part.strip()))
        elif part.split():
            out.append(" ".join(part.split()))
    return tuple(out)


def read_manifest(
    path: str | Path,
    *,
    check_audio: bool = True,
    check_content: bool = True,
    skip_bad: bool = False,
    max_seconds: float | None = 30.0,
    settle: bool = True,
) -> Manifest:
    """Read and validate a flat or conversation JSONL manifest (both shapes may be mixed).

    check_audio: every referenced clip must exist and its header be readable, not empty, not too
    short and at most max_seconds (None: no limit); Example.duration is filled from the header.
    check_content: also decode every clip and refuse NaN/inf and silence (omni.data.audio.check_file);
    only with check_audio. skip_bad: keep the good rows and return the problems (with a warning)
    instead of raising. settle=False: neither raise nor warn; a caller that adds its own checks
    calls `Manifest.settle(skip_bad)` once it has them all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found" if not path.exists() else f"{path}: not a file")
    base = path.parent
    examples: list[Example] = []
    problems: list[Problem] = []
    info_cache: dict[Path, tuple[float | None, str | None]] = {}  # a clip shared by rows is read once
    n_rows = 0

    def check(p: Path) -> tuple[float | None, str | None]:
        if p not in info_cache:
            dur, err = audio.check_header(p, max_seconds)
            if err is None and check_content:
                err = audio.check_file(p, max_seconds)
            info_cache[p] = (dur, f"{p}: {err}" if err else None)
        return info_cache[p]

    with path.open(encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            n_rows += 1
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                problems.append(Problem(path, lineno, f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            if not isinstance(row, dict):
                problems.append(Problem(path, lineno, f"expected a JSON object, got {type(row).__name__}"))
                continue
            parsed, errs = _parse_conversation(row, base) if "conversations" in row else _parse_flat(row, base)
            durations = []
            if not errs and check_audio:
                for p in parsed["audios"]:
                    dur, err = check(p)
                    durations.append(dur)
                    if err:
                        errs.append(err)
            if errs:
                problems.extend(Problem(path, lineno, m) for m in errs)
                continue
            audios = parsed.pop("audios")
            examples.append(
                Example(
                    audio=audios[0],
                    audios=audios,
                    line=lineno,
                    source=path,
                    duration=durations[0] if durations else None,
                    **parsed,
                )
            )
    if n_rows == 0:
        problems.append(Problem(path, 0, "manifest has no rows"))
    manifest = Manifest(path=path, examples=examples, problems=problems, n_rows=n_rows)
    return manifest.settle(skip_bad, stacklevel=2) if settle else manifest


# --- writing ------------------------------------------------------------------------------------


def _rel(p: str | Path, base: Path) -> str:
    """Relative to base (posix) when the clip lies under base; absolute otherwise (a relative
    '../..' path would break as soon as either tree moves)."""
    q = Path(p).expanduser().resolve()
    try:
        return q.relative_to(base).as_posix()
    except ValueError:
        return str(q)


def write_manifest(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as JSONL, audio paths (the "audio" value, or <audio> tags in conversations)
    rewritten relative to the manifest's folder. A relative path in a row is taken as relative to
    the current directory, like any path. Written to a temp file and renamed: never half a file;
    an identical existing file is not rewritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    lines = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"write_manifest {path}: row {i} is a {type(row).__name__}, expected dict")
        row = dict(row)
        if "conversations" in row:
            row["conversations"] = [
                {**t, "value": AUDIO_TAG.sub(lambda m: f"<audio>{_rel(m.group(1).strip(), base)}</audio>", t["value"])}
                for t in row["conversations"]
            ]
        elif "audio" in row:
            row["audio"] = _rel(row["audio"], base)
        else:
            raise ValueError(f"write_manifest {path}: row {i} has neither 'audio' nor 'conversations'")
        lines.append(json.dumps(row, ensure_ascii=False, default=str))
    content = "".join(line + "\n" for line in lines)
    if path.is_file() and path.read_text(encoding="utf-8") == content:
        return path  # unchanged: leave the file (and its mtime) alone, so reruns write nothing
    return atomic_write(path, content)
