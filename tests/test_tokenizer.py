import random
import time

import pytest

from omni.model.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

# A few hundred English sentences, generated from a seeded grammar (no data files needed).
_SUBJ = ["the cat", "a young woman", "my brother", "the old sailor", "every student", "the doctor", "she", "he", "they"]
_VERB = ["walked to", "looked at", "talked about", "remembered", "carried", "painted", "wrote about", "found"]
_OBJ = ["the river", "a small house", "the morning train", "her garden", "the quiet village", "his letters", "the market"]
_TAIL = ["", " yesterday", " in the evening", " before the storm", " with great care", " without a word"]


def english(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)}{rng.choice(_TAIL)}.".capitalize()
        for _ in range(n)
    ]


# Random strings drawn from awkward parts of Unicode (hypothesis is not a dependency).
_POOLS = [
    (0x20, 0x7E),  # ASCII printable
    (0x00, 0x1F),  # control characters incl. \n \t \r \0
    (0xC0, 0x17F),  # accented Latin
    (0x370, 0x3FF),  # Greek
    (0x4E00, 0x4FFF),  # CJK
    (0x1F300, 0x1F6FF),  # emoji
    (0x300, 0x36F),  # combining marks (NFC would change these: there must be no normalizer)
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "  leading and trailing  ", "\n\nnew\r\nlines\t\n", "e\u0301 vs \u00e9", "👩‍👩‍👧 🇫🇷", "<|bos|>"]
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(_POOLS)
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(english(400), vocab_size=512)


def test_byte_roundtrip_and_bos():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.bos_id == 256
    for s in random_strings(300) + ["\ud800 lone surrogate"]:
        ids = tok.encode(s)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == s
        with_bos = tok.encode(s, bos=True)
        assert with_bos[0] == 256 and with_bos[1:] == ids
        assert tok.decode(with_bos) == s
    assert tok.encode("hé") == [104, 0xC3, 0xA9]


def test_byte_decode_malformed():
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 104, 256, 105]) == "\ufffdhi"  # invalid byte -> U+FFFD, BOS skipped
    assert tok.decode(tok.encode("🙂")[:2]) == "\ufffd"  # a cut-off emoji
    with pytest.raises(ValueError, match="0..256"):
        tok.decode([257])


def test_bpe_trains_fast_and_roundtrips(bpe: BPETokenizer):
    t0 = time.perf_counter()
    BPETokenizer.train(english(400), vocab_size=4096)
    assert time.perf_counter() - t0 < 5.0
    assert bpe.vocab_size <= 512 and bpe.decode([bpe.bos_id]) == ""
    for s in random_strings(300, seed=1):
        ids = bpe.encode(s)
        assert bpe.decode(ids) == s, repr(s)
        assert bpe.encode(s, bos=True) == [bpe.bos_id] + ids
        assert bpe.decode([bpe.bos_id] + ids) == s
    assert bpe.bos_id not in bpe.encode("text with <|bos|> inside")  # never injected from text
    assert "\ufffd" in bpe.decode(bpe.encode("🙂")[:1])  # malformed UTF-8 -> U+FFFD, no error
    with pytest.raises(ValueError, match="ids must be in"):
        bpe.decode([bpe.vocab_size])


def test_bpe_compresses_english(bpe: BPETokenizer):
    held_out = " ".join(english(100, seed=123))
    n_bytes, n_bpe = len(ByteTokenizer().encode(held_out)), len(bpe.encode(held_out))
    print(f"\nBPE (vocab {bpe.vocab_size}) on held-out English: {n_bytes / n_bpe:.2f} bytes per token")
    assert n_bpe < n_bytes / 2


def test_bpe_save_load(bpe: BPETokenizer, tmp_path):
    path = bpe.save(tmp_path / "tokenizer.json")
    assert path.is_file()
    for loaded in (BPETokenizer.load(path), load_tokenizer(str(path)), load_tokenizer(str(tmp_path))):
        assert isinstance(loaded, BPETokenizer)
        assert (loaded.vocab_size, loaded.bos_id) == (bpe.vocab_size, bpe.bos_id)
        for s in random_strings(50, seed=2) + english(20):
            assert loaded.encode(s) == bpe.encode(s)
        assert bpe.bos_id not in loaded.encode("<|bos|>")  # setting survives save/load


def test_load_tokenizer_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    for bad in ["bytes", "", str(tmp_path / "missing.json"), str(tmp_path)]:
        with pytest.raises(ValueError, match="spec"):
            load_tokenizer(bad)
