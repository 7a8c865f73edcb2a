"""Trained runs: one way from "a run" (a folder or an MLflow run id) to its model, for every user of
one (omni transcribe, omni chat, omni texture, notebooks 06 and 07, the benchmarks).

Design choices:
- A run is named the way a user has it at hand: its model folder (holding audio_path.json), the
  report folder holding model/, the folder of a grid of such runs (every */model), or the
  32-character MLflow run id whose `model` artifact is fetched from the tracking store. Alignment
  runs (omni.experiments.alignment) and instruction-tuned ones (omni.experiments.tuning) are the
  same kind of folder: the audio path, audio_path.json, and LoRA adapters or an LM copy if trained.
- `load_run` is the only loader: the LM is placed by its own loader (omni.model.lm.load_lm; a k-bit
  model cannot be moved with .to), the audio path is moved to it, the run's adapters are put back.
- The model at its initialisation ("before training") is rebuilt, not stored: alignment seeds torch
  with the run's seed right before building the SpeechLM, and the LM is loaded before that, so the
  same seed and config rebuild the same initial weights.
- An alignment run's feature cache is reopened through omni.experiments.alignment.prepare_cache with
  the run's own config: never synthesized here, since a wrong working directory would cost minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from omni.data.features import FeatureCache
from omni.experiments.alignment import AlignConfig, prepare_cache
from omni.model.encoder import WhisperEncoder, collate_states
from omni.model.lm import load_lm, load_lora
from omni.model.speech_lm import LoopGuard, SpeechLM, SpeechLMConfig
from omni.train import pick_device


def model_dir(run: str | Path, name: str = "run") -> Path:
    """The model folder (holding audio_path.json) of one run: a folder, a report folder holding
    model/, or an MLflow run id. `name`: the parameter an error names (e.g. "--run" for the CLI)."""
    path = Path(run)
    if not path.exists() and len(str(run)) == 32 and str(run).isalnum():
        import mlflow

        try:
            path = Path(mlflow.artifacts.download_artifacts(run_id=str(run), artifact_path="model"))
        except Exception as e:  # no such run in this store, or a run without a model artifact
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"{name} {run}: an MLflow run id, but its `model` artifact could not be fetched ({first})") from None
    if (path / "model" / "audio_path.json").exists():
        path = path / "model"
    if not (path / "audio_path.json").exists():
        kind = report_experiment(path)
        if kind:  # a report folder of an experiment that keeps no audio path (smoke, pretrain_lm, layer_ablation, ...)
            raise FileNotFoundError(f"{name} {run}: a {kind} run ({kind}'s report folder), which keeps no trained audio path; "
                                    "give an alignment or instruct run (reports/alignment/<stamp>, reports/instruct/<stamp>)")
        raise FileNotFoundError(f"{name} {run}: neither a trained run folder (audio_path.json) nor a known MLflow run id")
    return path


def report_experiment(folder: Path) -> str:
    """The experiment whose report folder this is (its summary.json says so), or ""."""
    try:
        return str(json.loads((Path(folder) / "summary.json").read_text()).get("experiment", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def run_dirs(run: str) -> list[Path]:
    """`run` ("a,b,c") -> model folders. Each item is what `model_dir` takes, or a grid report
    folder (every child */model, e.g. from `omni run experiments/alignment.yaml -p layer=[last,middle]`)."""
    items = [r.strip() for r in str(run).split(",") if r.strip()]
    if not items:
        raise ValueError("no alignment run given: pass -p run=reports/alignment/<stamp> (or an MLflow run id; "
                         "comma-separate several runs to compare layer choices)")
    out = []
    for item in items:
        path = Path(item)
        children = sorted(p.parent for p in path.glob("*/model/audio_path.json")) if path.is_dir() else []
        if children and not (path / "audio_path.json").exists() and not (path / "model" / "audio_path.json").exists():
            out += children
            continue
        try:
            out.append(model_dir(item))
        except FileNotFoundError:
            raise FileNotFoundError(f"run {item!r}: neither an alignment run folder (audio_path.json), nor a grid of them "
                                    "(*/model/audio_path.json), nor a known MLflow run id") from None
    return out


def run_meta(run: str | Path, name: str = "run") -> tuple[Path, dict]:
    """(model folder, its audio_path.json) of one run, without loading a model."""
    path = model_dir(run, name)
    return path, json.loads((path / "audio_path.json").read_text())


def load_run(run: str | Path, device: str = "cpu", name: str = "run") -> tuple[SpeechLM, dict]:
    """(trained SpeechLM in eval mode, its audio_path.json) of one run (see `model_dir`)."""
    path, meta = run_meta(run, name)
    dev = pick_device(device)
    gpt, tok = load_lm(meta["lm"], dev, load_in=meta.get("load_in", ""))
    load_lora(gpt, path)  # the run's LoRA adapters, if it trained some
    model = SpeechLM(gpt, tok, meta["n_states"], meta["d_whisper"], SpeechLMConfig(**meta["speech_lm"]))
    model.select.to(dev)  # the LM is placed by its loader (a k-bit model cannot be moved with .to)
    model.projector.to(dev)
    model.load_audio_path(path)
    model.eval()
    return model, meta


def run_encoder(meta: dict, device: torch.device | str = "cpu") -> tuple[WhisperEncoder, str]:
    """(the Whisper encoder a run was trained on, its encoding mode): what turns new audio into the
    states the run's audio path reads."""
    return WhisperEncoder.from_source(meta["encoder"], device=device), meta.get("encoder_mode", "var")


def initial_model(model: SpeechLM, meta: dict) -> SpeechLM:
    """The run's SpeechLM at its initialisation, sharing `model`'s (frozen) GPT: rebuilt exactly as
    alignment built it, torch.manual_seed(seed) then SpeechLM(...) with the run's config."""
    torch.manual_seed(int(meta.get("align", {}).get("seed", 0)))
    init = SpeechLM(model.gpt, model.tokenizer, meta["n_states"], meta["d_whisper"], SpeechLMConfig(**meta["speech_lm"]))
    return init.to(model.gpt_device).eval()


def run_cache(meta: dict) -> FeatureCache:
    """The feature cache a run trained on. An instruction-tuned run names its cache folder; an
    alignment run its corpus, which must exist (paths in audio_path.json are as the run was given
    them, usually relative to the repository root); its cache is rebuilt if missing."""
    if "instruct" in meta:
        return FeatureCache.open(meta["features"])
    align = meta.get("align")
    if not align:
        raise ValueError("audio_path.json has no `align` section: not written by omni.experiments.alignment")
    manifest = Path(align["corpus"]) / "manifest.jsonl"
    if not manifest.exists():  # never synthesize one here: a wrong working directory would cost minutes
        raise FileNotFoundError(f"the run's corpus manifest {manifest} does not exist (working directory {Path.cwd()}); "
                                "run from the folder the alignment ran in")
    fields = AlignConfig.__dataclass_fields__
    return prepare_cache(AlignConfig(**{k: v for k, v in align.items() if k in fields}))


@torch.no_grad()
def transcribe_waves(model: SpeechLM, encoder: WhisperEncoder, waves: list[torch.Tensor], mode: str = "var", batch_size: int = 16,
                     max_new_tokens: int = 120, guard: LoopGuard | None = None) -> list[str]:
    """Audio in, text out: encoder -> layer choice -> projector -> greedy decoding (under `guard` if given)."""
    out = []
    device = model.gpt_device
    for i in range(0, len(waves), batch_size):
        states = encoder.encode([w.to(device) for w in waves[i : i + batch_size]], mode=mode, batch_size=batch_size)
        hidden, lengths = collate_states(states)
        out += model.transcribe(hidden.to(device), lengths.to(device), max_new_tokens=max_new_tokens, guard=guard)
    return out
