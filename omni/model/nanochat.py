"""Read a nanochat checkpoint folder into omni's GPT, without unpickling anything that can run code.

nanochat (github.com/karpathy/nanochat) writes, per step, `model_<step:06d>.pt` (a torch.save'd
state dict), `meta_<step:06d>.json` (its `model_config` and training facts) and, once, a tokenizer
folder holding `tokenizer.pkl` (a pickled tiktoken Encoding) and `token_bytes.pt`.

Design choices:
- Weights: `torch.load(weights_only=True)` only (tensors and plain containers, no code). A
  torch.compile `_orig_mod.` prefix is stripped; every tensor becomes float32 (nanochat stores wte
  and value embeddings in bf16); vocabulary padding (to a multiple of 64, from 2025-12-09) is cropped
  from wte, lm_head and the value embeddings: padded rows are never indexed and nanochat slices
  their logits off itself.
- Tokenizer: the pickle is read by an unpickler that admits one global, tiktoken's `Encoding`, and
  maps it onto a stand-in that only records its state (name, pat_str, mergeable_ranks,
  special_tokens); nothing of tiktoken runs while unpickling. The Encoding is then rebuilt from
  that state. Any other global (os.system, builtins.eval, ...) is refused.
- Architecture: the checkpoint does not say which nanochat commit wrote it, and the constants of
  nanochat's forward (RoPE base, q/k scale, softcap, ...) live in its code, not in the checkpoint.
  So the loader recognises the format period from the state dict's keys and shapes and the meta's
  `model_config`, and maps it onto omni.model.gpt.GPTConfig fields (omni's GPT implements every period
  below; tests/test_nanochat.py checks each against logits made by nanochat's own code). A key,
  shape or model_config field that no period has is refused, and named.

The periods (read from nanochat's nanochat/gpt.py, flash_attention.py, checkpoint_manager.py and
scripts; "seq" is model_config.sequence_len):

| period (commits, dates) | recognised by | constants not in the checkpoint |
| --- | --- | --- |
| P0 3a5e0bc..ccf4b7f (2025-10-13 .. 2026-01-10) | wte, h.N.attn.c_{q,k,v,proj}, h.N.mlp.c_{fc,proj}, lm_head only; no window_pattern (or all "L") | RoPE 10k, no q/k scale, softcap 15, rotary tables in bf16 |
| P1 aa530cd..fbc1484^ (2026-01-11, 1.5 h) | + resid_lambdas [L], x0_lambdas [L]; no window_pattern | as P0; full attention (refused unless told, see below) |
| P2 fbc1484..e3f58b8^ (2026-01-11 .. 01-16) | P1's keys; window_pattern in model_config | as P0; short window seq // 2 |
| P3 e85db6b..6ed7d1d^ (2026-01-16 .. 03-09) | + value_embeds.{i} [V, kv_dim] on layers i % 2 == (L - 1) % 2, h.{i}.attn.ve_gate [n_kv_head, 32] | as P2; gate 2 sigmoid on the first 32 channels; softcap 15 until aba30cb (03-02), 20 from it |
| P4 6ed7d1d..a825e63^ (2026-03-09 .. 03-14) | ve_gate [n_kv_head, 12]; no smear | RoPE 100k, q/k x 1.15 after QK-norm, gate 3 sigmoid on 12 channels, short window ceil(seq / 384) * 128, softcap 15, rotary tables fp32 |
| P5 a825e63..92d63d4 (2026-03-14 .. 07-03, HEAD) | + smear_gate [1, 24], smear_lambda [1], backout_lambda [1] | as P4 but q/k x 1.2, short window ceil(seq / 512) * 128; smear on 24 channels; backout after block L // 2 |

Constants that hold in every period: ReLU^2 MLP (4x), parameter-free RMSNorm, untied head, no biases,
QK-norm after rotary (nanochat rotates by -theta, as omni does), value embeddings on the layers
i % 2 == (L - 1) % 2, window_pattern tiled over the layers with the last one always full, a window
(W, 0) letting a query see itself and the W keys before it, the long window = seq (full).
Where nanochat's short window reaches past seq, it cuts nothing, as in nanochat.

Cannot be told apart, and how that is handled:
- P3's softcap: 15 (e85db6b..aba30cb^, six weeks) or 20 (aba30cb..6ed7d1d^, one week). Same keys,
  shapes and model_config; base_train's arguments (the meta's user_config) kept their names from
  2026-02-18 to 03-09, and an SFT checkpoint carries another script's. Neither is likely enough to
  pick, so it is refused unless told: `softcap=` to load_nanochat, or a top-level `"softcap": 15`
  (or 20) in meta_<step>.json (nanochat reads only the meta keys it knows). Greedy decoding is the
  same under both (the softcap is monotonic); probabilities are not.
- Rotary tables: nanochat held them in bf16 on every device until 1076f97 (2026-03-04), then in its
  compute dtype (fp32 on a CPU, bf16 on a GPU). omni follows nanochat's CPU fp32 forward: bf16-rounded
  tables for P0..P3, fp32 from P4 on (the two differ by up to ~1e-2 in a logit of the test fixtures;
  a GPU run of nanochat, all in bf16, differs from both by more). The softcap-20 week straddles
  1076f97; P3 takes bf16 for all of it.
- P1 (lambdas, no window_pattern) against mid_train / chat_sft checkpoints written before 8b4849d
  (2026-02-01): those scripts dropped window_pattern from model_config, though the model was trained
  with its base's windows ("SSSL" by default from 2026-01-11); nanochat's own loader then patches in
  "L". Lambdas (or value embeddings) with no window_pattern are refused, asking for the pattern the
  base checkpoint's meta records (or "L" for a base checkpoint of 2026-01-11 before fbc1484).
- Refused and named, though recognised: the same-day value-embedding experiments of 2026-01-16
  (e3f58b8 value_embed_A/B + v0_lambdas, 0b58d70 value_embed + v0_lambdas, 9a88194 value_embeds on
  every layer + v0_lambdas) and engram (59e36cc..74554be, 2026-01-25..28: bigram_embed, bigram_lambdas),
  each replaced or reverted within days.
- A mid_train / chat_sft checkpoint records its own max_seq_len as sequence_len, while its windows
  were computed from the base model's during training; omni, like nanochat's loader, uses the meta's.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from omni.model.gpt import GPT, GPTConfig


@dataclass(frozen=True)
class Period:
    """One nanochat checkpoint format: the key groups that mark it, and its constants."""

    name: str
    commits: str
    lambdas: bool  # resid_lambdas, x0_lambdas
    ve_gate: int  # value embeddings: the gate's input channels (0 = none)
    smear: bool  # smear_gate, smear_lambda, backout_lambda
    rope_base: float
    qk_scale: float
    ve_gate_scale: float
    softcap: float | None  # None: this period held two softcaps that the checkpoint cannot tell apart
    short_window: Callable[[int], int]  # sequence_len -> keys an S layer sees before the query
    rotary_bf16: bool


def _half(seq: int) -> int:
    return seq // 2


def _ceil_tiles(seq: int, div: int) -> int:
    # nanochat: -(-seq // div // 128) * 128, i.e. ceil(seq / (div * 128)) tiles of 128
    return -(-seq // div // 128) * 128


PERIODS = (
    Period("P0", "3a5e0bc..ccf4b7f (2025-10-13 .. 2026-01-10)", False, 0, False, 1e4, 1.0, 2.0, 15.0, _half, True),
    Period("P1/P2", "aa530cd..e3f58b8^ (2026-01-11 .. 01-16)", True, 0, False, 1e4, 1.0, 2.0, 15.0, _half, True),
    Period("P3", "e85db6b..6ed7d1d^ (2026-01-16 .. 03-09)", True, 32, False, 1e4, 1.0, 2.0, None, _half, True),
    Period("P4", "6ed7d1d..a825e63^ (2026-03-09 .. 03-14)", True, 12, False, 1e5, 1.15, 3.0, 15.0,
           lambda s: _ceil_tiles(s, 3), False),
    Period("P5", "a825e63..92d63d4 (2026-03-14 .. 2026-07-03)", True, 12, True, 1e5, 1.2, 3.0, 15.0,
           lambda s: _ceil_tiles(s, 4), False),
)
SOFTCAPS_P3 = (15.0, 20.0)  # e85db6b..aba30cb^ and aba30cb..6ed7d1d^
SMEAR_CHANNELS = 24

# keys of nanochat variants that were recognised but are not implemented: prefix -> what wrote them
EXPERIMENTS = {
    "v0_lambdas": "the value-residual experiments of 2026-01-16 (e3f58b8, 0b58d70, 9a88194; replaced by e85db6b the same day)",
    "value_embed_A.": "the low-rank value embedding of e3f58b8 (2026-01-16, replaced the same day)",
    "value_embed.": "the single value embedding of 0b58d70 (2026-01-16, replaced the same day)",
    "bigram_embed.": "engram (59e36cc..c8d93be, 2026-01-25..27; reverted by 74554be)",
    "bigram_lambdas": "engram (59e36cc..c8d93be, 2026-01-25..27; reverted by 74554be)",
}
MODEL_CONFIG_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern"}


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.glob("model_*.pt")) and any(path.glob("meta_*.json"))


def latest_step(path: Path) -> int:
    steps = [int(m.group(1)) for f in path.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", f.name))]
    if not steps:
        raise FileNotFoundError(f"{path}: no model_<step>.pt here")
    return max(steps)


# --- recognising the format ------------------------------------------------------------------------


def _period(state: dict[str, Tensor], n_kv_head: int) -> Period:
    """The period whose key groups the state dict holds; refuses experiments and unknown mixtures."""
    for prefix, what in EXPERIMENTS.items():
        hits = [k for k in state if k.startswith(prefix)]
        if hits:
            raise ValueError(f"keys {hits[:3]} are from {what}: omni does not load that nanochat variant")
    lambdas = any(k in state for k in ("resid_lambdas", "x0_lambdas"))
    smear = any(k in state for k in ("smear_gate.weight", "smear_lambda", "backout_lambda"))
    gates = {k: tuple(v.shape) for k, v in state.items() if k.endswith(".attn.ve_gate.weight")}
    channels = 0
    if gates or any(k.startswith("value_embeds.") for k in state):
        known = {(n_kv_head, c): c for c in (32, 12)}  # e85db6b..6ed7d1d^, then 6ed7d1d on
        bad = {k: list(s) for k, s in sorted(gates.items()) if s not in known}
        found = sorted({known[s] for s in gates.values() if s in known})
        if bad or len(found) != 1:
            raise ValueError(f"value-embedding gates {bad or dict(sorted(gates.items())[:4]) or 'missing'}: nanochat's are "
                             f"all [n_kv_head={n_kv_head}, 32] (2026-01-16 .. 03-09) or all [{n_kv_head}, 12] (from 2026-03-09)")
        channels = found[0]
    ve = channels > 0
    for p in PERIODS:
        if (p.lambdas, p.ve_gate, p.smear) == (lambdas, channels, smear):
            return p
    groups = [g for g, on in (("resid/x0 lambdas", lambdas), (f"value embeddings (gate {channels})", ve), ("smear/backout", smear)) if on]
    raise ValueError(f"no nanochat format holds {' + '.join(groups) or 'none of the later parts'} together "
                     f"(smear needs 12-channel value embeddings, value embeddings need lambdas)")


def _expected(p: Period, c: GPTConfig, rows: int) -> dict[str, tuple[int, ...]]:
    """Every key the period's GPT has, with its shape (rows = wte's, padded or not)."""
    D, L, kv = c.n_embd, c.n_layer, c.n_kv_head * c.head_dim
    e: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (rows, D), "lm_head.weight": (rows, D)}
    for i in range(L):
        h = f"transformer.h.{i}."
        e |= {h + "attn.c_q.weight": (D, D), h + "attn.c_k.weight": (kv, D), h + "attn.c_v.weight": (kv, D),
              h + "attn.c_proj.weight": (D, D), h + "mlp.c_fc.weight": (4 * D, D), h + "mlp.c_proj.weight": (D, 4 * D)}
        if p.ve_gate and i % 2 == (L - 1) % 2:  # nanochat's has_ve (c has value_embeds off here)
            e |= {f"value_embeds.{i}.weight": (rows, kv), h + "attn.ve_gate.weight": (c.n_kv_head, p.ve_gate)}
    if p.lambdas:
        e |= {"resid_lambdas": (L,), "x0_lambdas": (L,)}
    if p.smear:
        e |= {"smear_gate.weight": (1, SMEAR_CHANNELS), "smear_lambda": (1,), "backout_lambda": (1,)}
    return e


def recognise(state: dict[str, Tensor], model_config: dict, softcap: float | None = None) -> tuple[Period, GPTConfig]:
    """The period of a (prefix-stripped) nanochat state dict + meta model_config, and the GPTConfig that
    computes what nanochat computes for it. softcap: the logit softcap where the period cannot tell (P3)."""
    mc = dict(model_config)
    unknown = sorted(set(mc) - MODEL_CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"model_config fields {unknown} are not in any nanochat GPTConfig omni knows ({sorted(MODEL_CONFIG_FIELDS)})")
    absent = sorted(MODEL_CONFIG_FIELDS - {"window_pattern"} - set(mc))
    if absent:
        raise ValueError(f"model_config lacks {absent}")
    pattern = mc.pop("window_pattern", None)
    shape = GPTConfig(**mc)  # the six shape fields, validated (heads divide the width, ...)
    p = _period(state, shape.n_kv_head)

    # keys and shapes: exactly the period's, the vocabulary padded to a multiple of 64 or not at all
    V = shape.vocab_size
    rows = state["transformer.wte.weight"].shape[0] if "transformer.wte.weight" in state else V
    if rows not in (V, -(-V // 64) * 64):
        raise ValueError(f"transformer.wte.weight has {rows} rows: neither vocab_size {V} nor it padded to a multiple of 64")
    want = _expected(p, shape, rows)
    extra = {k: list(state[k].shape) for k in sorted(set(state) - set(want))}
    missing = {k: list(want[k]) for k in sorted(set(want) - set(state))}
    wrong = {k: f"{list(state[k].shape)} (expected {list(want[k])})" for k in sorted(set(want) & set(state))
             if tuple(state[k].shape) != want[k]}
    if extra or missing or wrong:
        parts = [f"{what} {dict(list(d.items())[:6])}" for what, d in (("unexpected keys", extra), ("missing keys", missing),
                                                                        ("wrong shapes", wrong)) if d]
        raise ValueError(f"not nanochat's {p.name} format ({p.commits}): " + "; ".join(parts))

    # windows: P0 has none; every later period records its pattern (see the module docstring for the SFT gap)
    if pattern is None and p.lambdas:
        raise ValueError(
            f"keys of nanochat {p.name} ({p.commits}) but meta model_config has no window_pattern: nanochat's "
            f"mid_train/chat_sft before 8b4849d (2026-02-01) dropped it, though the model was trained with its base "
            f"model's windows. Add the base checkpoint's \"window_pattern\" (\"SSSL\" by default since 2026-01-11; "
            f"\"L\" for a base checkpoint of aa530cd, 2026-01-11) to model_config in the meta JSON")
    pattern = (pattern or "L").upper()
    if not p.lambdas and "S" in pattern:
        raise ValueError(f"window_pattern {pattern!r} with no resid/x0 lambdas: no nanochat commit wrote this")

    cap = p.softcap
    if softcap is not None and cap is not None and float(softcap) != cap:
        raise ValueError(f"softcap {softcap} given, but nanochat {p.name} ({p.commits}) always used {cap}")
    if cap is None:
        if softcap is None or float(softcap) not in SOFTCAPS_P3:
            raise ValueError(
                f"nanochat {p.name} ({p.commits}): its logit softcap was 15 until aba30cb (2026-03-02) and 20 from "
                f"it until 6ed7d1d (2026-03-09); the checkpoint cannot tell which. Say which: add \"softcap\": 15 "
                f"(or 20) at the top level of the meta JSON, or pass softcap= to omni.model.nanochat.load_nanochat")
        cap = float(softcap)
    short = p.short_window(shape.sequence_len) if "S" in pattern else 0
    if "S" in pattern and short < 1:
        raise ValueError(f"sequence_len {shape.sequence_len} gives nanochat a short window of {short}")
    cfg = GPTConfig(**mc, softcap=cap, rope_base=p.rope_base, rotary_bf16=p.rotary_bf16, qk_scale=p.qk_scale,
                    smear=p.smear, smear_channels=SMEAR_CHANNELS, lambdas=p.lambdas, value_embeds=p.ve_gate > 0,
                    ve_gate_channels=p.ve_gate or 12, ve_gate_scale=p.ve_gate_scale, backout=p.smear,
                    window_pattern=pattern, short_window=short)
    return p, cfg


def omni_state(state: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """nanochat's tensors as omni's GPT holds them: float32, the vocabulary padding cropped."""
    out = {}
    for k, v in state.items():
        if not torch.is_floating_point(v):
            raise ValueError(f"{k} is {v.dtype}: nanochat's weights are floating point")
        if k == "transformer.wte.weight" or k == "lm_head.weight" or k.startswith("value_embeds."):
            v = v[:vocab_size]
        out[k] = v.float()
    return out


# --- the tokenizer ---------------------------------------------------------------------------------


class _EncodingState:
    """What tiktoken.Encoding.__getstate__ wrote; kept as data, never executed."""

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"tokenizer.pkl: expected an Encoding's state dict, got {type(state).__name__}")
        self.state = state


class SafeUnpickler(pickle.Unpickler):
    """Admits tiktoken's Encoding class only (as a stand-in that records its state)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"tokenizer.pkl: refused global {module}.{name} (only tiktoken.core.Encoding is allowed)")


def read_encoding_state(data: bytes) -> dict:
    obj = SafeUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise pickle.UnpicklingError("tokenizer.pkl: not a pickled tiktoken Encoding")
    st = obj.state
    ok = (isinstance(st.get("mergeable_ranks"), dict) and isinstance(st.get("special_tokens"), dict)
          and isinstance(st.get("pat_str"), str) and isinstance(st.get("name"), str))
    if not ok:
        raise pickle.UnpicklingError("tokenizer.pkl: the Encoding state lacks name/pat_str/mergeable_ranks/special_tokens")
    return st


class NanochatTokenizer:
    """nanochat's tokenizer (tiktoken, `<|bos|>` as document delimiter) with omni's interface."""

    def __init__(self, state: dict):
        import tiktoken

        self.enc = tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"],
                                     mergeable_ranks=state["mergeable_ranks"], special_tokens=state["special_tokens"])
        if "<|bos|>" not in state["special_tokens"]:
            raise ValueError("nanochat tokenizer has no <|bos|> special token")
        self.bos_id: int = state["special_tokens"]["<|bos|>"]
        self.eos_id: int = self.bos_id  # nanochat ends a document with the next one's BOS
        self.vocab_size: int = self.enc.n_vocab
        self._special = set(state["special_tokens"].values())

    @classmethod
    def load(cls, directory: str | Path) -> "NanochatTokenizer":
        return cls(read_encoding_state((Path(directory) / "tokenizer.pkl").read_bytes()))

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.enc.encode_ordinary(text)  # special tokens written in a text stay plain text
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if int(i) not in self._special])


def find_tokenizer(path: Path) -> Path:
    """The tokenizer folder: inside the checkpoint folder, or nanochat's base dir layout
    (<base>/base_checkpoints/d12 -> <base>/tokenizer)."""
    for d in (path, path / "tokenizer", path.parent.parent / "tokenizer"):
        if (d / "tokenizer.pkl").exists():
            return d
    raise FileNotFoundError(f"{path}: no tokenizer.pkl in it, in {path / 'tokenizer'}, or in {path.parent.parent / 'tokenizer'}")


# --- the loader ------------------------------------------------------------------------------------


def load_nanochat(path: str | Path, device: torch.device | str = "cpu", step: int | None = None,
                  softcap: float | None = None) -> tuple[GPT, NanochatTokenizer]:
    """(omni GPT, tokenizer) for a nanochat checkpoint folder; the latest step unless `step` is given.
    softcap: only for the one period whose softcap the checkpoint cannot tell (see the module docstring);
    a top-level "softcap" in the meta JSON says the same."""
    path = Path(path)
    step = latest_step(path) if step is None else step
    meta = json.loads((path / f"meta_{step:06d}.json").read_text())
    if softcap is None:
        softcap = meta.get("softcap")
    tok = NanochatTokenizer.load(find_tokenizer(path))
    state = torch.load(path / f"model_{step:06d}.pt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # torch.compile's prefix
    try:
        _, cfg = recognise(state, meta["model_config"], softcap)
    except ValueError as e:
        raise ValueError(f"{path / f'model_{step:06d}.pt'}: {e}") from None
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer vocab {tok.vocab_size} != model vocab_size {cfg.vocab_size}")
    gpt = GPT(cfg)  # built on the CPU (rotary tables included), then overwritten
    gpt.load_state_dict(omni_state(state, cfg.vocab_size), strict=True)
    return gpt.to(device), tok
