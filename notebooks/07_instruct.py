# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: omni,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
#   omni:
#     config: omni.experiments.instruct.InstructConfig
#     derived:
#     - out
#     experiment: instruct
# ---

# %% [markdown]
# # 07 · Instruction tuning on texture, and the texture benchmark
# Frozen Whisper states of the synthesized corpus go through the projector into the pretrained LM,
# which is tuned (LoRA adapters by default) on questions about the voice: gender, accent, rate, pitch,
# style, same speaker, plus transcription and two content checks. The benchmark asks the held-out
# test set (unseen sentences, unseen voices) and a **hard set** (the same unseen voices at rates and
# pitches outside the training ranges), each beside three baselines on the same questions: the
# transcript only (the same model, no audio: what the words give away), shuffled audio (another
# clip's audio: a listening model falls to chance) and a linear probe on pooled Whisper states (a
# ceiling for what the features hold).

# %% tags=["parameters"]
# generated from omni.experiments.instruct.InstructConfig by `python -m omni.params`: edit the dataclass, not this cell
instructions: str = 'data/instructions'  # folder with train.jsonl and val.jsonl (omni data instructions)
features: str = ''  # feature cache folder (FeatureCache) holding every clip the conversations name
lm: str = 'runs/lm'  # pretrained LM folder (GPT.save + tokenizer.json, or bytes)
run: str = ''  # a trained run to start the audio path (layer choice + projector) from: folder, report folder or MLflow run id; "" : fresh
layer: str = 'weighted'  # Whisper state(s) for the projector (as omni.model.speech_lm)
k: int = 4  # frames per audio token
projector: str = 'stack'  # stack | conv | avg
trainable: str = 'projector+lora'  # projector+lora (peft adapters) | projector (frozen LM) | projector+lm (whole LM)
lora_rank: int = 16  # LoRA rank r (trainable:projector+lora)
lora_alpha: float = 32.0  # LoRA scale alpha / r
lora_dropout: float = 0.0  # dropout on the adapters' input
lora_targets: str = ''  # comma-separated module names; "" : attention + MLP projections of the backbone
steps: int = 150  # optimiser steps (about 2.5 s each on 2 shared CPU cores at batch 8)
batch_size: int = 8  # conversations per step
lr: float = 0.002  # AdamW peak learning rate
warmup: int = 10  # linear warm-up steps
eval_every: int = 0  # steps between val-loss evaluations; 0 : only at the end
val_rows: int = 128  # val conversations in each val-loss evaluation (a seeded subsample: the full split costs minutes on CPU); 0 : all
seed: int = 0  # batches, init
device: str = 'auto'  # auto | cpu | cuda
dtype: str = 'bfloat16'  # autocast dtype on CUDA; CPU runs float32
corpus: str = 'data/synth'  # synth corpus the instructions are built from when `instructions` lacks train.jsonl
hard_corpus: str = 'data/synth_hard'  # the hard test corpus (split test_hard), rendered from `corpus`'s config if missing
hard_clips: int = 300  # clips of the hard corpus when it is built; 0 : no hard set
hard_features: str = 'cache/features'  # feature cache root for the hard corpus
encoder: str = 'tiny.en'  # Whisper source of the features (the hard corpus's are built with it)
bench_per_task: int = 40  # questions per task in each benchmark (a seeded subsample); 0 : all
transcripts: str = 'reference'  # transcript-only baseline's text: reference (a perfect transcriber) | whisper
mlflow_run_id: str = ""  # MLflow run to log into; empty: start a new run in the default store
out_dir: str = "reports/instruct/adhoc"  # folder this run writes its files into

# %%
import pandas as pd
from IPython.display import display

from omni import params, track
from omni.eval import texture
from omni.experiments import instruct, plots

cfg = params.from_params(instruct.InstructConfig, globals(), out=f"{out_dir}/model")  # adapters and audio path there
tracker = track.open_run("instruct", mlflow_run_id, cfg, {"out_dir": out_dir})
res = instruct.run(cfg, tracker)
m = res.metrics
print(f"trained {cfg.steps} steps ({cfg.trainable}) in {m['train_seconds']:.0f} s; val loss {m['val_loss']:.3f}")

# %% [markdown]
# ## Training

# %%
fig = plots.loss_curves({"train loss": res.tuning.history.loss}, title=f"instruction tuning: {cfg.trainable}, lr {cfg.lr}")
plots.show(tracker, fig, "loss.png")

# %% [markdown]
# ## Per task: accuracy with its 95% CI, chance and the three baselines
# Bars per task and answerer, whiskers the bootstrap 95% CI, black ticks chance. "texture" pools the
# texture tasks' questions; transcription is scored by WER below, not here (exact match).

# %%
names = {"test": "held-out voices (test)", "test_hard": "hard set: rate and pitch outside training (test_hard)"}
for name, b in res.benches.items():
    fig = instruct.save_benchmark(b, f"{out_dir}/bench_{name}", title=f"{names[name]}: {b.n_questions} questions")
    plots.show(tracker, fig, f"bench_{name}.png")
    table = pd.DataFrame(texture.task_table(b.results)).set_index("task")
    print(names[name])
    display(table.style.format({c: "{:.3f}" for c in table.columns if c != "n"}))

# %% [markdown]
# ## What the model hears, and what it does not
# "Hears" means the CI lies above chance and above both the transcript-only and the shuffled-audio
# answers; "partly hears" that the accuracy (not the CI) is above them.

# %%
for name, b in res.benches.items():
    ok, why = texture.meets_bar(b.results)
    print(f"{names[name]}: {'PASSES' if ok else 'FALLS SHORT OF'} the bar: {why}")
    for line in texture.findings(b.results):
        print("  " + line)
    t = b.transcribe
    if t:
        print(f"  transcription through chat: WER {t['wer']:.3f} (median {t['median_wer']:.3f}) on {t['n']:.0f} clips; "
              f"clear speech {t.get('clear_wer', float('nan')):.3f} on {t['n_clear']:.0f} (the alignment recipe's clear-speech WER: RESULTS.md)")
    print()

# %%
summary = pd.Series({k: v for k, v in m.items() if not k.startswith(("acc_", "hard_acc_"))})
display(summary.to_frame("value").style.format("{:.3f}"))
assert m["texture_mean"] > m["shuffled_texture_mean"], "the model does no better with the right audio than with shuffled audio"
tracker.finish()
