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
# Frozen Whisper states of the synthesized corpus go through the projector (and a few pooled voice
# tokens) into the LM, which is tuned (LoRA adapters or the whole LM; `instruct.yaml` starts from the
# hearing model and tunes the whole LM) on questions about the voice: gender, accent, rate, pitch, style, same
# speaker, plus transcription and two content checks. Answers are written as prose ("Assistant:" then
# " female"), the loss is a mean per answer, then per conversation, and batches are mostly texture
# questions with every answer of a task drawn equally often, so a task's prior says nothing and only
# the audio can. While it trains, clips of held-out voices are asked their texture questions with their
# own and with shuffled audio: the listening curves below.
#
# The benchmark then asks the held-out test set (unseen sentences, unseen voices; 150 questions per task,
# stratified by answer) and a **hard set** (the same unseen voices at rates and pitches outside the
# training ranges), each beside four baselines on the same questions: **train majority** (each task's most
# frequent training answer: a model that learned the prior), **transcript only** (a probe on the transcript's
# text: what the words give away), **shuffled audio** (another clip's audio: a listening model falls to the
# prior) and a **linear probe** on pooled Whisper states (a ceiling for what the features hold, always
# answering in a valid form; hence the model's share of valid answers beside its accuracy). Last, the
# **listening ladder** says where, between the audio and the answer, each texture is lost.

# %% tags=["parameters"]
# generated from omni.experiments.instruct.InstructConfig by `python -m omni.params`: edit the dataclass, not this cell
corpus: str = 'data/synth'  # the synthesized speech corpus the clips come from (omni.data.synth)
features: str = 'cache/features'  # feature cache: a cache folder (index.json), or the root the corpus's cache is built under
encoder: str = 'tiny.en'  # Whisper source of the features (omni.model.whisper_weights)
encoder_mode: str = 'var'  # var (each clip its own length) | pad30 (Whisper's 30 s window)
lm: str = 'models/lm'  # the LM: an omni LM folder (models/lm: the committed copying LM), a nanochat checkpoint folder, or a Hugging Face model folder or hub id
load_in: str = ''  # "" | 8bit | 4bit: k-bit weights for a Hugging Face LM (bitsandbytes, CUDA only)
run: str = ''  # a trained run to start from (its audio path and shape, its LM as it left it): run folder, report folder or MLflow run id; "" : fresh
layer: str = 'last'  # Whisper state(s) the projector reads: last | middle | <index> | weighted | weighted_ln
k: int = 4  # Whisper frames per audio token (50 frames/s / k tokens per second)
projector: str = 'stack'  # stack | conv | avg | lego (posteriors over the LM vocabulary mixing its token embeddings, LegoSLM)
projector_hidden: int = 0  # the projector MLP's hidden width; 0 : the LM's width (n_embd)
voice_tokens: int = 0  # soft tokens pooled from the whole clip (the voice: omni.model.projector.VoicePool) before the audio tokens; 0 : none
trainable: str = 'projector'  # projector (frozen LM) | projector+lora (peft adapters on the LM) | projector+lm (the whole LM)
lora_rank: int = 16  # LoRA rank r (trainable:projector+lora)
lora_alpha: float = 32.0  # LoRA scale alpha / r
lora_dropout: float = 0.0  # dropout on the adapters' input
lora_targets: str = ''  # comma-separated module names; "" : attention + MLP projections of the backbone
lora_grad_clip: float = 0.0  # > 0: LoRA gradients clipped to this norm on their own (0 : with the rest)
lm_lr: float = 0.0  # > 0: the LM's own parameters (adapters or weights) at this peak learning rate instead of `lr`
max_bad_steps: int = 10  # stop with an error after this many non-finite steps in a row (0 : never)
early_lr_factor: float = 1.0  # lr multiplier for the first early_steps steps
early_steps: int = 0  # steps at early_lr_factor * lr (on top of the warmup)
freeze_projector_steps: int = 0  # the projector stays still for this many steps (the layer mix, LoRA or LM adapt first)
steps: int = 600  # optimiser steps
batch_size: int = 32  # clips (alignment) or conversations (tuning) per step
lr: float = 0.002  # AdamW peak learning rate
warmup: int = 50  # linear warm-up steps
eval_every: int = 150  # steps between evaluations; 0 : only at the end
seed: int = 0  # fixes the initialisation, the batches and every shuffle
device: str = 'auto'  # auto | cpu | cuda
dtype: str = 'bfloat16'  # autocast dtype on CUDA; the CPU runs float32
instructions: str = 'data/instructions'  # folder with train.jsonl and val.jsonl (omni data instructions)
texture_share: float = 0.85  # share of each batch drawn from the texture tasks (equally per task); the rest from transcription, content and multi-turn rows
balance_answers: bool = True  # within a task, draw each answer equally often: a flat prior per task, so only the audio separates the answers
val_rows: int = 64  # val conversations in each val-loss evaluation (a seeded subsample: the full split costs minutes on CPU); 0 : all
perception_steps: int = 0  # the first steps train on voice captions alone ("describe": perception first, as LTU), then the task mix
voice_at_answer: bool = False  # the clip's voice tokens again just before each "Assistant:", two positions from where the answer is read (the ladder finds the voice in the audio tokens but not in the LM's state at the answer); needs voice_tokens
hard_corpus: str = 'data/synth_hard'  # the hard test corpus (split test_hard), rendered from `corpus`'s config if missing
hard_clips: int = 300  # clips of the hard corpus when it is built; 0 : no hard set
hard_features: str = 'cache/features'  # feature cache root for the hard corpus
bench_per_task: int = 150  # questions per task in each benchmark (a seeded sample, stratified by answer); 0 : all
watch_clips: int = 24  # held-out clips (split test) whose texture questions are asked at every evaluation, with their own and shuffled audio; left out of the benchmark; 0 : none
transcripts: str = 'reference'  # what the transcript-only probe reads: reference (a perfect transcriber) | whisper
ladder_per_task: int = 150  # questions per task (train and test each) of the listening ladder on the final model; 0 : no ladder
mlflow_run_id: str = ""  # MLflow run to log into; empty: start a new run in the default store
out_dir: str = "reports/instruct/adhoc"  # folder this run writes its files into

# %%
import pandas as pd
from IPython.display import display

from omni import params, track
from omni.data.instructions import TEXTURE_TASKS
from omni.eval import texture
from omni.experiments import instruct, plots

cfg = params.from_params(instruct.InstructConfig, globals(), out=f"{out_dir}/model")  # adapters and audio path there
tracker = track.open_run("instruct", mlflow_run_id, cfg, {"out_dir": out_dir})
res = instruct.run(cfg, tracker)
m = res.metrics
print(f"trained {cfg.steps} steps x {cfg.batch_size} conversations ({cfg.trainable}) in {m['train_seconds']:.0f} s; val loss {m['val_loss']:.3f}")

# %% [markdown]
# ## Training, and listening while training
# The loss (a mean per conversation); then, per texture task, balanced accuracy on clips of held-out
# voices with their own audio (solid) and with shuffled audio (dashed), at every evaluation. Those clips
# are left out of the benchmark, and nothing is selected by them.

# %%
fig = plots.loss_curves({"train loss": res.tuning.history.loss}, title=f"instruction tuning: {cfg.trainable}, lr {cfg.lr}")
plots.show(tracker, fig, "loss.png")
if any("watch_texture" in e for e in res.tuning.history.evals):
    plots.show(tracker, plots.listening_curves(res.tuning.history.evals, TEXTURE_TASKS), "listening.png")

# %% [markdown]
# ## Per task: accuracy with its 95% CI beside chance and the baselines
# Bars per task and answerer, whiskers the bootstrap 95% CI, black ticks chance. "texture" pools the
# texture tasks' questions; transcription is scored by WER below, not here (exact match). In the table,
# `balanced` is the mean over answers of the accuracy on that answer's questions and `valid` the share of
# answers that are one of the question's options (or its letter).

# %%
names = {"test": "held-out voices (test)", "test_hard": "hard set: rate and pitch outside training (test_hard)"}
for name, b in res.benches.items():
    fig = instruct.save_benchmark(b, f"{out_dir}/bench_{name}", title=f"{names[name]}: {b.n_questions} questions")
    plots.show(tracker, fig, f"bench_{name}.png")
    table = pd.DataFrame(texture.task_table(b.results)).set_index("task")
    print(names[name])
    display(table.style.format({c: "{:.3f}" for c in table.columns if c != "n"}, na_rep="-"))

# %% [markdown]
# ## Hearing the value, or binding it to a letter
# Half the closed questions name the answer in words ("open"), half list lettered options ("mc") and
# want the letter. Picking the right value and binding it to its letter are two steps; a model that
# hears but cannot bind answers the open questions well and every lettered one with the same letter.
# Per texture task and format: balanced accuracy and the share of the answer given most often.

# %%
for name, b in res.benches.items():
    if b.formats:
        print(names[name])
        display(pd.DataFrame(b.formats).set_index(["task", "format"]).style.format({"balanced": "{:.3f}", "top_answer_share": "{:.2f}"}))

# %% [markdown]
# ## Where the voice is lost: the listening ladder
# On held-out voices, per texture task: a linear probe on the Whisper states the projector reads, on the
# audio tokens it writes (mean over the clip), on the LM's state where the answer starts, and the model's
# own answer (the option its first token prefers); the voice tokens (hollow) are a path beside the audio
# tokens. Crosses: the answer with another clip's audio and with silence. Where a line falls is where
# that task's voice is lost; the table adds the right answer's logit margin and the share of the answer
# position's attention on the audio.

# %%
if res.ladder is not None:
    plots.show(tracker, plots.ladder(res.ladder.table()), "ladder.png")
    display(pd.DataFrame(res.ladder.table()).set_index("task").style.format(precision=2))
    for line in res.ladder.where_lost():
        print(line)

# %% [markdown]
# ## What the model hears, and what it does not
# "Hears" means the CI lies above the floor (the larger of chance and train majority) and above both the
# transcript-only and the shuffled-audio answers; "partly hears" that the accuracy (not the CI) is above
# them. The bar: each of gender, accent, rate, pitch and style 10 points above shuffled audio
# and above train majority and transcript-only, and the texture mean 25 points above the floor.

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
summary = pd.Series({k: v for k, v in m.items() if not k.startswith(("acc_", "bal_", "valid_", "hard_acc_", "hard_bal_", "hard_valid_"))})
display(summary.to_frame("value").style.format("{:.3f}"))
assert m["texture_mean"] > m["shuffled_texture_mean"], "the model does no better with the right audio than with shuffled audio"
tracker.finish()
