"""
Tokenizers: raw UTF-8 bytes (no training, vocab 257) and a byte-level BPE trained with HF `tokenizers`.

Both share one small interface: vocab_size, bos_id, eos_id, encode(text, bos=False), decode(ids).
BOS doubles as end of text (eos_id == bos_id), nanochat's convention: <|bos|> delimits documents.
Both are lossless: decode(encode(s)) == s for any str. The BPE gets that from a ByteLevel
pre-tokenizer (text is mapped to its UTF-8 bytes before merges, every byte is in the base
alphabet) and no normalizer; "<|bos|>" written inside a text is encoded as plain text, never as BOS.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

BOS = "<|bos|>"


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS = 256."""

    vocab_size: int = 257
    bos_id: int = 256
    eos_id: int = 256  # BOS ends a text too

    def encode(self, text: str, bos: bool = False) -> list[int]:
        # surrogatepass: a lone surrogate (possible in a Python str) still encodes and round-trips
        ids = list(text.encode("utf-8", errors="surrogatepass"))
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i <= self.bos_id]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must be in 0..{self.bos_id}, got {bad[:5]}")
        data = bytes(i for i in ids if i != self.bos_id)
        # surrogatepass mirrors encode; anything else malformed (e.g. a cut-off emoji) becomes U+FFFD
        try:
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-split) with one special token, <|bos|>."""

    def __init__(self, tokenizer: "tokenizers.Tokenizer"):  # noqa: F821 (lazy import)
        bos_id = tokenizer.token_to_id(BOS)
        if bos_id is None:
            raise ValueError(f"BPETokenizer: the tokenizer has no {BOS} token")
        # special tokens written in a text are plain text: a transcript can never inject a BOS
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.bos_id: int = bos_id
        self.eos_id: int = bos_id  # BOS ends a text too
        self.vocab_size: int = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()  # all 256 bytes: any string is encodable
        if vocab_size < len(alphabet) + 1:
            raise ValueError(f"vocab_size={vocab_size} must be at least {len(alphabet) + 1} (256 bytes + BOS)")
        tok = Tokenizer(models.BPE())
        # add_prefix_space=False: a leading space is kept as-is, so decode(encode(s)) == s
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[BOS], initial_alphabet=alphabet, show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:  # HF would silently drop them
            raise ValueError(f"BPETokenizer.decode: ids must be in 0..{self.vocab_size - 1}, got {bad[:5]}")
        # the ByteLevel decoder turns malformed UTF-8 (e.g. a cut-off emoji) into U+FFFD
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, path: str | Path) -> Path:
        """Write one tokenizer.json (path is the file, or an existing directory to put it in)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return cls(Tokenizer.from_file(str(path)))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(spec: str) -> ByteTokenizer | BPETokenizer:
    """"byte" -> ByteTokenizer; a path to a saved tokenizer.json (or its directory) -> BPETokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"load_tokenizer: spec={spec!r} is neither 'byte' nor a path to a saved BPE tokenizer.json "
            f"({path} does not exist)"
        )
    return BPETokenizer.load(path)
