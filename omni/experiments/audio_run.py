"""One audio-path run: what alignment and instruction tuning share, from the config to the saved
folder and back.

A run trains the audio path (layer choice + projector) and, as `trainable` says, LoRA adapters on
the LM or the whole LM, on cached Whisper states. Alignment (omni.experiments.alignment) and
instruction tuning (omni.experiments.tuning) differ only in their data, loss and evaluation; the
rest is here, once:

- `AudioRunConfig`, the fields both recipes have; each recipe's config extends it.
- `build_model`: the LM, frozen but for `trainable`; the audio path seeded, or started from a run.
- `trainable_parameters`: what the training loop optimises, by name (the names key checkpoints).
- `save_run` / `load_run`: one folder for every run, read one way:

      audio_path.safetensors      layer choice + projector
      audio_path.json             how to rebuild it: lm (path or hub id), load_in, encoder, encoder_mode,
                                  features, speech_lm (the shape), n_states, d_whisper, trainable,
                                  saved (what the folder holds), recipe, config (every parameter),
                                  ctc_head, decoding, and what the recipe adds (its scores)
      lora.safetensors, lora.json the adapters (trainable=projector+lora)
      lm/                         the LM as the run left it (trainable=projector+lm, or adapters of a
                                  run it started from merged in); `lm` then points here

- `model_dir`, `run_dirs`, `run_meta`: from what a user has at hand (a run folder, its report folder,
  a grid of them, an MLflow run id) to the folder; `run_encoder`, `run_cache`, `initial_model`,
  `transcribe_waves` for the users of a run (omni transcribe, omni chat, omni texture, notebooks 06, 07).

Design choices:
- A run started from another (`run`) takes that run's audio path and shape, and its LM as that run
  left it: adapters are merged into the weights (and trained on as new adapters if `trainable` says
  so), an LM copy is read from its folder. `lm` is then the run's, said once when it differs.
- The LM is placed by its own loader (a k-bit model cannot be moved with .to); the audio path is
  built on the CPU in fp32 and moved, with torch seeded right before it, so the same seed and config
  rebuild the same initial weights (`initial_model`).
- A missing local LM folder is an error naming the parameter and how to make one: never a hub
  download of a local name, nor a 20-minute pretraining nobody asked for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from omni.data.features import FeatureCache, build_features
from omni.model.encoder import MODES, LayerSelect, WhisperEncoder, collate_states, require_layer
from omni.model.hf_lm import check_load_in
from omni.model.lm import LoraSpec, is_hub_id, load_lm, load_lora, merge_lora, save_lm, save_lora
from omni.model.projector import Projector, ProjectorConfig
from omni.model.speech_lm import DECODES, TRAINABLE, Decoding, LoopGuard, SpeechLM, SpeechLMConfig, lm_parameters
from omni.params import require, require_choice, require_device
from omni.train import DTYPES, pick_device

LAYOUT = 2  # audio_path.json's layout; runs saved before it are read too (`run_meta`)


@dataclass
class AudioRunConfig:
    corpus: str = "data/synth"  # the synthesized speech corpus the clips come from (omni.data.synth)
    features: str = "cache/features"  # feature cache: a cache folder (index.json), or the root the corpus's cache is built under
    encoder: str = "tiny.en"  # Whisper source of the features (omni.model.whisper_weights)
    encoder_mode: str = "var"  # var (each clip its own length) | pad30 (Whisper's 30 s window)
    lm: str = "models/lm"  # the LM: an omni LM folder (models/lm: the committed copying LM), a nanochat checkpoint folder, or a Hugging Face model folder or hub id
    load_in: str = ""  # "" | 8bit | 4bit: k-bit weights for a Hugging Face LM (bitsandbytes, CUDA only)
    run: str = ""  # a trained run to start from (its audio path and shape, its LM as it left it): run folder, report folder or MLflow run id; "" = fresh
    layer: str = "last"  # Whisper state(s) the projector reads: last | middle | <index> | weighted | weighted_ln
    k: int = 4  # Whisper frames per audio token (50 frames/s / k tokens per second)
    projector: str = "stack"  # stack | conv | avg | lego (posteriors over the LM vocabulary mixing its token embeddings, LegoSLM)
    projector_hidden: int = 0  # the projector MLP's hidden width; 0 = the LM's width (n_embd)
    voice_tokens: int = 0  # soft tokens pooled from the whole clip (the voice: omni.model.projector.VoicePool) before the audio tokens; 0 = none
    trainable: str = "projector"  # projector (frozen LM) | projector+lora (peft adapters on the LM) | projector+lm (the whole LM)
    lora_rank: int = 16  # LoRA rank r (trainable=projector+lora)
    lora_alpha: float = 32.0  # LoRA scale alpha / r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = ""  # comma-separated module names; "" = attention + MLP projections of the backbone
    lora_grad_clip: float = 0.0  # > 0: LoRA gradients clipped to this norm on their own (0 = with the rest)
    lm_lr: float = 0.0  # > 0: the LM's own parameters (adapters or weights) at this peak learning rate instead of `lr`
    max_bad_steps: int = 10  # stop with an error after this many non-finite steps in a row (0 = never)
    early_lr_factor: float = 1.0  # lr multiplier for the first early_steps steps
    early_steps: int = 0  # steps at early_lr_factor * lr (on top of the warmup)
    freeze_projector_steps: int = 0  # the projector stays still for this many steps (the layer mix, LoRA or LM adapt first)
    steps: int = 600  # optimiser steps
    batch_size: int = 32  # clips (alignment) or conversations (tuning) per step
    lr: float = 2e-3  # AdamW peak learning rate
    warmup: int = 50  # linear warm-up steps
    eval_every: int = 150  # steps between evaluations; 0 = only at the end
    seed: int = 0  # fixes the initialisation, the batches and every shuffle
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # autocast dtype on CUDA; the CPU runs float32
    out: str = ""  # folder the trained run is saved in (resume checkpoints under out/resume); "" = not saved

    MIN_STEPS: ClassVar[int] = 1  # a recipe may allow 0 (no training: an evaluation of a run as it is)

    def __post_init__(self) -> None:
        """Types and ranges, refused in one line naming the parameter before any corpus, cache or LM
        is touched (`omni run` builds the config before a kernel starts)."""
        require(self.steps >= self.MIN_STEPS, "steps", self.steps, f">= {self.MIN_STEPS}")
        for name in ("k", "batch_size"):
            require(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("warmup", "eval_every", "early_steps", "freeze_projector_steps", "max_bad_steps", "seed"):
            require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        require(self.lr > 0, "lr", self.lr, "> 0")
        require(self.lm_lr >= 0, "lm_lr", self.lm_lr, ">= 0 (0 = lr)")
        require(self.projector_hidden >= 0, "projector_hidden", self.projector_hidden, ">= 0 (0 = the LM's width)")
        require(self.voice_tokens >= 0, "voice_tokens", self.voice_tokens, ">= 0")
        require(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "> 0")
        require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "in [0, 1)")
        require(self.early_lr_factor > 0, "early_lr_factor", self.early_lr_factor, "> 0")
        require_choice("trainable", self.trainable, TRAINABLE)
        require_choice("encoder_mode", self.encoder_mode, MODES)
        require_choice("dtype", self.dtype, DTYPES)
        require_layer(self.layer, self.encoder)
        require_device(self.device)
        check_load_in(self.load_in)  # k-bit without CUDA: refused before anything is touched
        if self.load_in and self.trainable == "projector+lm":
            raise ValueError(f"trainable=projector+lm cannot train k-bit weights (load_in={self.load_in!r}): use projector+lora (parameter `trainable`)")
        require(self.lora_rank >= 1, "lora_rank", self.lora_rank, ">= 1")
        Projector(ProjectorConfig(d_in=1, d_out=1, k=self.k, kind=self.projector, vocab=2))  # raises naming `projector` or `k`

    def lora(self) -> LoraSpec:
        return LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=self.lora_targets)

    def speech_lm(self) -> SpeechLMConfig:
        """The audio path's shape: the SpeechLMConfig fields this config has (a recipe may add the rest)."""
        names = SpeechLMConfig.__dataclass_fields__
        return SpeechLMConfig(**{n: getattr(self, n) for n in names if hasattr(self, n)})


def check_layer(cfg: AudioRunConfig, n_states: int) -> None:
    """The layer choice against the encoder's states, once the cache is open."""
    LayerSelect(cfg.layer, n_states)  # raises naming `layer`


def require_lm(lm: str) -> None:
    """A missing local LM folder: an error naming the parameter and how to make one."""
    if Path(lm).exists() or is_hub_id(lm):
        return
    raise FileNotFoundError(f"parameter `lm` = {lm!r}: no LM there. Pass -p lm=FOLDER (an omni LM folder, a nanochat "
                            f"checkpoint or a Hugging Face model), or pretrain one: omni run experiments/pretrain_lm.yaml -p out={lm}")


# --- build ----------------------------------------------------------------------------------------


@dataclass
class Built:
    """What build_model made: the model, the LM parameters that train, and where it started."""

    model: SpeechLM
    lm_params: dict[str, torch.nn.Parameter]  # the LM's trainable parameters by name (adapters, all of it, or none)
    start: Path | None  # the run it started from
    lm_changed: bool  # the LM in memory is no folder on disk (a started run's adapters merged in): save_run keeps a copy


def start_shape(cfg: AudioRunConfig) -> tuple[SpeechLMConfig, Path | None, dict]:
    """(the audio path's shape, the run it starts from, that run's audio_path.json): the config's
    own shape, or a started run's (which wins; said once when it differs)."""
    shape = cfg.speech_lm()
    if not cfg.run:
        return shape, None, {}
    path, meta = run_meta(cfg.run, "run")
    saved = SpeechLMConfig(**meta["speech_lm"])
    if (saved.layer, saved.k, saved.projector) != (shape.layer, shape.k, shape.projector):
        print(f"run {cfg.run}: the audio path starts from it, so layer={saved.layer}, k={saved.k}, projector={saved.projector} "
              f"(not {shape.layer}, {shape.k}, {shape.projector})")
    if shape.voice_tokens and not saved.voice_tokens:  # voice tokens added on top of a run that had none: they start fresh
        saved = replace(saved, voice_tokens=shape.voice_tokens)
    saved = replace(saved, voice_at_answer=shape.voice_at_answer)  # the conversation's layout is the new run's to choose
    return saved, path, meta


def build_model(cfg: AudioRunConfig, n_states: int, d_whisper: int, device: torch.device) -> Built:
    """The SpeechLM of a run: the LM (`lm`, or the started run's), frozen but for `trainable`; the
    audio path seeded with `seed` (or the started run's weights)."""
    require_choice("trainable", cfg.trainable, TRAINABLE)  # a config changed after construction, too
    shape, start, meta = start_shape(cfg)
    lm_ref = run_lm(start, meta) if start else cfg.lm
    if start and Path(cfg.lm).resolve() != Path(lm_ref).resolve() and cfg.lm != AudioRunConfig.lm:
        print(f"run {cfg.run}: starts from its own LM {lm_ref}, not lm={cfg.lm}")
    require_lm(lm_ref)
    gpt, tok = load_lm(lm_ref, device, load_in=meta.get("load_in", cfg.load_in) if start else cfg.load_in)
    merged = bool(start and load_lora(gpt, start))
    if merged:  # the started run's adapters become part of the LM this run builds on
        if cfg.load_in:
            raise ValueError(f"run {cfg.run}: its LoRA adapters cannot be merged into k-bit weights (parameter `load_in`)")
        merge_lora(gpt)
    torch.manual_seed(cfg.seed)  # the audio path first, right after the seed: initial_model rebuilds it so
    model = SpeechLM(gpt, tok, n_states, d_whisper, shape)
    lm_params = lm_parameters(gpt, cfg.trainable, cfg.lora())  # new adapters draw their init next
    model.audio_path_to(gpt_device(gpt))
    if start:
        if (meta["n_states"], meta["d_whisper"]) != (n_states, d_whisper):
            raise ValueError(f"run {cfg.run}: its audio path reads {meta['n_states']} x {meta['d_whisper']} Whisper states, "
                             f"the features hold {n_states} x {d_whisper}: another encoder (parameter `run`)")
        try:
            model.load_audio_path(start)
        except RuntimeError as e:  # a projector of another width: another LM
            raise ValueError(f"run {cfg.run}: its projector does not fit the LM ({str(e).splitlines()[-1].strip()}) (parameter `run`)") from None
    model.gpt.train(bool(lm_params))
    return Built(model, lm_params, start, merged)


def gpt_device(gpt: torch.nn.Module) -> torch.device:
    return next(gpt.parameters()).device


def trainable_parameters(built: Built) -> dict[str, torch.nn.Parameter]:
    """Everything that trains, by name: the layer choice, the projector, and the LM's share."""
    model = built.model
    params = {f"select.{n}": p for n, p in model.select.named_parameters()}
    params |= {f"projector.{n}": p for n, p in model.projector.named_parameters()}
    if model.voice is not None:
        params |= {f"voice.{n}": p for n, p in model.voice.named_parameters()}
    return params | {f"gpt.{n}": p for n, p in built.lm_params.items()}


# --- save and load --------------------------------------------------------------------------------


def weights_sha256(folder: str | Path) -> str:
    """SHA-256 of an LM folder's weights file(s): what `lm` named when a run trained on it."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("model_*.pt"))
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def save_run(built: Built, cfg: AudioRunConfig, cache: FeatureCache, recipe: str, extra: dict | None = None,
             ctc_head: bool = False, decoding: Decoding | None = None) -> Path:
    """The run's folder (module docstring) in cfg.out; `extra` joins audio_path.json (scores, data paths).
    ctc_head: the audio tokens were trained to spell the LM vocabulary (CTC), so joint decoding can use them;
    decoding: how the run transcribes by default (omni transcribe, omni chat)."""
    out = Path(cfg.out)
    model = built.model
    model.save_audio_path(out)
    saved = ["audio_path"]
    lm_ref = run_lm(*run_meta(built.start)) if built.start else cfg.lm
    if cfg.trainable == "projector+lm" or built.lm_changed:  # the LM in memory is on no disk: keep it with the run
        if cfg.trainable == "projector+lora":  # the base under the new adapters, without them
            raise ValueError("a run that merged a started run's adapters and trains new ones cannot be saved yet: "
                             "use trainable=projector or projector+lm (parameter `trainable`)")
        save_lm(model.gpt, model.tokenizer, out / "lm")
        lm_ref = "lm"  # relative to the run's folder (run_lm): the folder moves with its LM
        saved.append("lm")
    elif not is_hub_id(lm_ref):
        lm_ref = str(Path(lm_ref).resolve())
    if cfg.trainable == "projector+lora":
        save_lora(model.gpt, cfg.lora(), out)
        saved.append("lora")
    lm_dir = out / lm_ref if lm_ref == "lm" else Path(lm_ref)
    meta = json.loads((out / "audio_path.json").read_text())
    meta |= {
        "layout": LAYOUT, "recipe": recipe, "lm": lm_ref, "lm_sha256": weights_sha256(lm_dir) if lm_dir.exists() else "",
        "load_in": cfg.load_in, "encoder": cache.index.get("encoder", cfg.encoder), "encoder_mode": cache.index.get("mode", cfg.encoder_mode),
        "features": str(Path(cache.path).resolve()), "manifest": cache.index.get("manifest", ""), "trainable": cfg.trainable, "saved": saved, "ctc_head": ctc_head,
        "decoding": asdict(decoding or Decoding()), "started_from": str(built.start) if built.start else "", "config": asdict(cfg),
    } | (extra or {})
    (out / "audio_path.json").write_text(json.dumps(meta, indent=2, default=str))
    return out


def model_dir(run: str | Path, name: str = "run") -> Path:
    """The folder holding audio_path.json of one run: that folder, a report folder holding model/,
    or an MLflow run id. `name`: the parameter an error names (e.g. "--run" for the CLI)."""
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
                                    "give an alignment or instruct run (reports/alignment/<stamp>, reports/instruct/<stamp>) or models/hear")
        raise FileNotFoundError(f"{name} {run}: neither a trained run folder (audio_path.json) nor a known MLflow run id")
    return path


def report_experiment(folder: Path) -> str:
    """The experiment whose report folder this is (its summary.json says so), or ""."""
    try:
        return str(json.loads((Path(folder) / "summary.json").read_text()).get("experiment", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def run_dirs(run: str) -> list[Path]:
    """`run` ("a,b,c") -> run folders. Each item is what `model_dir` takes, or a grid report folder
    (every child */model, e.g. from `omni run experiments/alignment.yaml -p layer=[last,middle]`)."""
    items = [r.strip() for r in str(run).split(",") if r.strip()]
    if not items:
        raise ValueError("no run given: pass -p run=reports/alignment/<stamp> (or an MLflow run id; "
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
            raise FileNotFoundError(f"run {item!r}: neither a run folder (audio_path.json), nor a grid of them "
                                    "(*/model/audio_path.json), nor a known MLflow run id") from None
    return out


def run_meta(run: str | Path, name: str = "run") -> tuple[Path, dict]:
    """(run folder, its audio_path.json) of one run, without loading a model. A run saved before
    LAYOUT 2 (its config under "align" or "instruct") is read into today's keys."""
    path = model_dir(run, name)
    meta = json.loads((path / "audio_path.json").read_text())
    if "config" not in meta:
        old = meta.get("align") or meta.get("instruct") or {}
        meta["config"] = old
        meta.setdefault("recipe", "alignment" if "align" in meta else "tuning")
        meta.setdefault("encoder", old.get("encoder", "tiny.en"))
        meta.setdefault("encoder_mode", old.get("encoder_mode", "var"))
        meta.setdefault("ctc_head", bool(old.get("ctc_weight", 0)) or meta["speech_lm"].get("projector") == "lego")
    return path, meta


def load_run(run: str | Path, device: str = "cpu", name: str = "run") -> tuple[SpeechLM, dict]:
    """(trained SpeechLM in eval mode, its audio_path.json) of one run (see `model_dir`)."""
    path, meta = run_meta(run, name)
    dev = pick_device(device)
    gpt, tok = load_lm(run_lm(path, meta), dev, load_in=meta.get("load_in", ""))
    if load_lora(gpt, path) and not meta.get("load_in"):  # the run's adapters, if it trained some: folded into
        merge_lora(gpt)  # the weights (as a run started from it does), one matmul per layer instead of three
    model = SpeechLM(gpt, tok, meta["n_states"], meta["d_whisper"], SpeechLMConfig(**meta["speech_lm"]))
    model.audio_path_to(dev)
    model.load_audio_path(path)
    model.eval()
    return model, meta


def run_lm(path: Path, meta: dict) -> str:
    """The LM a run reads: audio_path.json's `lm`, a path relative to the run's folder where it is one
    (a run that carries its LM, or a committed model beside the LM it sits on), else as written."""
    lm = meta["lm"]
    return str(path / lm) if not Path(lm).is_absolute() and (path / lm).exists() else lm


def run_decoding(meta: dict, decode: str = "", beam: int = 0, ctc_decode_weight: float = -1.0) -> Decoding:
    """The run's own decoding (audio_path.json's `decoding`), with any setting the caller gives over it;
    joint decoding only for a run with a CTC head."""
    d = Decoding(**meta.get("decoding", {}))
    d = Decoding(decode or d.decode, beam or d.beam, d.ctc_decode_weight if ctc_decode_weight < 0 else ctc_decode_weight)
    require_choice("decode", d.decode, DECODES)
    if d.decode == "joint" and not meta.get("ctc_head"):
        raise ValueError("decode=joint needs a run trained with a CTC head (ctc_weight > 0 or projector=lego); this one has none: use decode=greedy")
    return d


def run_encoder(meta: dict, device: torch.device | str = "cpu") -> tuple[WhisperEncoder, str]:
    """(the Whisper encoder a run was trained on, its encoding mode): what turns new audio into the
    states the run's audio path reads."""
    return WhisperEncoder.from_source(meta.get("encoder", "tiny.en"), device=device), meta.get("encoder_mode", "var")


def initial_model(model: SpeechLM, meta: dict) -> SpeechLM:
    """The run's SpeechLM at its initialisation, sharing `model`'s GPT: rebuilt as build_model built
    it, torch.manual_seed(seed) then SpeechLM(...) with the run's shape."""
    torch.manual_seed(int(meta.get("config", {}).get("seed", 0)))
    init = SpeechLM(model.gpt, model.tokenizer, meta["n_states"], meta["d_whisper"], SpeechLMConfig(**meta["speech_lm"]))
    return init.to(model.gpt_device).eval()


def run_cache(meta: dict) -> FeatureCache:
    """The feature cache a run trained on: its folder, or rebuilt from the manifest it was built from
    (never synthesized here: a wrong working directory would cost minutes)."""
    features = meta.get("features") or ""
    if features and (Path(features) / "index.json").is_file():
        return FeatureCache.open(features)
    cfg = meta.get("config", {})
    manifest = meta.get("manifest") or str(Path(cfg.get("corpus", "data/synth")) / "manifest.jsonl")
    if not Path(manifest).is_file():
        raise FileNotFoundError(f"the run's feature cache {features or '(none named)'} and its manifest {manifest} are both missing "
                                f"(working directory {Path.cwd()}); rebuild the corpus, or run from the folder the run ran in")
    root = Path(features).parent if features else Path(cfg.get("features", "cache/features"))
    return FeatureCache.open(build_features(manifest, root, meta.get("encoder", "tiny.en"), mode=meta.get("encoder_mode", "var")))


@torch.no_grad()
def transcribe_waves(model: SpeechLM, encoder: WhisperEncoder, waves: list[torch.Tensor], mode: str = "var", batch_size: int = 16,
                     max_new_tokens: int = 120, guard: LoopGuard | None = None, decoding: Decoding | None = None) -> list[str]:
    """Audio in, text out: encoder -> layer choice -> projector -> decoding (`decoding`: greedy under
    `guard` if given, or joint CTC/LM beam search)."""
    out = []
    device = model.gpt_device
    for i in range(0, len(waves), batch_size):
        states = encoder.encode([w.to(device) for w in waves[i : i + batch_size]], mode=mode, batch_size=batch_size)
        hidden, lengths = collate_states(states)
        out += [h.text for h in model.hypotheses(hidden.to(device), lengths.to(device), max_new_tokens, guard, decoding)]
    return out
