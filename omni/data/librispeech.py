"""A flat manifest from a LibriSpeech-layout folder, for users who have the corpus (it cannot be
downloaded here).

Layout: ROOT[/SUBSET]/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt, whose lines are
"SPEAKER-CHAPTER-UTT WORDS...", beside SPEAKER-CHAPTER-UTT.flac; optionally SPEAKERS.TXT in ROOT or
its parent ("ID | SEX | SUBSET | MINUTES | NAME", ';' comments) for a gender label.

Design choices:
- ROOT may be one subset (dev-clean/) or the LibriSpeech/ folder holding several: transcripts are
  found with rglob, and the folder above the speaker's is recorded as the `subset` label.
- Transcripts are checked whole before anything is written: a malformed line, an id that does not
  belong to its file, a duplicate id or an entry without its flac is an error naming file:line, all
  collected into one ManifestError. So is a flac that Whisper could not take (omni.data.audio.check_file:
  undecodable, empty, NaN/inf, silent, too short, over 30 s), as `trans.txt:line: flac: reason`:
  every flac is decoded once here (LibriSpeech is 16 kHz, so no resampling), and the manifest that
  comes out holds only clips that encode. skip_bad leaves those rows out and prints every one. A flac without a transcript line is only counted and warned
  about (some users prune transcripts on purpose), never silently dropped.
- Text is kept as LibriSpeech writes it (upper case, no punctuation); normalising for training or
  scoring is the consumer's choice, not the manifest's.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from omni.data import audio
from omni.data.manifest import ManifestError, Problem, write_manifest

_GENDER = {"F": "female", "M": "male"}


def read_speakers(root: Path) -> dict[str, str]:
    """speaker id -> 'female'/'male' from SPEAKERS.TXT in root or its parent ({} if absent)."""
    for folder in (root, root.parent):
        f = folder / "SPEAKERS.TXT"
        if f.is_file():
            out = {}
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = [p.strip() for p in line.split("|")]
                if line.startswith(";") or len(parts) < 2:
                    continue
                if parts[1].upper() in _GENDER:
                    out[parts[0]] = _GENDER[parts[1].upper()]
            return out
    return {}


def librispeech_manifest(root: str | Path, out: str | Path, skip_bad: bool = False) -> int:
    """Write a flat manifest (audio, text, labels speaker/chapter/id/subset[/gender]) for every
    transcribed utterance under root; returns the number of rows written. skip_bad: leave out the
    utterances whose audio is bad (listed on stdout) instead of raising; transcript problems still raise."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: LibriSpeech root folder not found")
    transcripts = sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise FileNotFoundError(f"{root}: no SPEAKER/CHAPTER/*.trans.txt files (is this a LibriSpeech folder?)")
    genders = read_speakers(root)
    problems: list[Problem] = []
    bad_audio: list[Problem] = []  # skippable with skip_bad
    rows: list[dict] = []
    transcribed: set[Path] = set()
    for trans in transcripts:
        chapter_dir = trans.parent
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        if trans.name != f"{speaker}-{chapter}.trans.txt":
            problems.append(Problem(trans, 0, f"expected the name {speaker}-{chapter}.trans.txt in folder {speaker}/{chapter}"))
            continue
        seen: set[str] = set()
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            m = re.fullmatch(r"(\S+)\s+(\S.*?)\s*", line)
            if not m or not re.fullmatch(r"\d+-\d+-\d+", m.group(1)):
                problems.append(Problem(trans, lineno, f"malformed transcript line (expected 'SPEAKER-CHAPTER-UTT WORDS...'): {line[:60]!r}"))
                continue
            uid, words = m.groups()
            if not uid.startswith(f"{speaker}-{chapter}-"):
                problems.append(Problem(trans, lineno, f"id {uid} does not belong to {speaker}-{chapter}"))
                continue
            if uid in seen:
                problems.append(Problem(trans, lineno, f"duplicate id {uid}"))
                continue
            seen.add(uid)
            flac = chapter_dir / f"{uid}.flac"
            if not flac.is_file():
                problems.append(Problem(trans, lineno, f"no audio for {uid}: {flac} not found"))
                continue
            transcribed.add(flac)
            reason = audio.check_file(flac)
            if reason:
                bad_audio.append(Problem(trans, lineno, f"{flac}: {reason}"))
                continue
            row = {"audio": flac.resolve(), "text": words, "speaker": speaker, "chapter": chapter, "id": uid}
            row["subset"] = chapter_dir.parent.parent.name
            if speaker in genders:
                row["gender"] = genders[speaker]
            rows.append(row)
    if problems or (bad_audio and not skip_bad):
        raise ManifestError(root, sorted(problems + bad_audio, key=lambda p: (str(p.file), p.line)))
    if bad_audio:
        print(f"{root}: skipped {len(bad_audio)} utterance(s) with bad audio:")
        print("\n".join(f"  {p}" for p in bad_audio))
    untranscribed = sorted(set(root.rglob("*.flac")) - transcribed)
    if untranscribed:
        warnings.warn(
            f"{root}: {len(untranscribed)} flac file(s) have no transcript line and were left out, "
            f"e.g. {untranscribed[0]}",
            stacklevel=2,
        )
    write_manifest(out, rows)
    return len(rows)
