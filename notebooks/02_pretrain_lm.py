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
#     display_name: Python 3
#     language: python
#     name: python3
#   omni:
#     config: omni.experiments.pretrain_lm.PretrainConfig
#     derived:
#     - ckpt_dir
#     experiment: pretrain_lm
# ---

# %% [markdown]
# # 02 · Pretrain the text LM
# A BPE tokenizer and a small nanochat-style GPT trained on offline public-domain English
# (see `omni/data/LICENSES.md`), with the speech corpus's held-out sentences removed so that the
# LM cannot have memorised the transcripts alignment is scored on. Validation in bits per byte.
# On a GPU box scale it with `-p depth=12 -p steps=5000 -p device=cuda`; for several GPUs use
# `torchrun --nproc_per_node N -m omni.experiments.pretrain_lm --depth 12 ...`.

# %% tags=["parameters"]
# generated from omni.experiments.pretrain_lm.PretrainConfig by `python -m omni.params`: edit the dataclass, not this cell
out: str = 'runs/lm'  # where the LM folder is written
sources: str = 'all'  # "all" (every installed source) or comma-separated names of omni.data.text sources
tokenizer: str = 'bpe'  # bpe | byte
vocab_size: int = 4096  # BPE vocabulary (ignored for byte)
depth: int = 4  # GPT depth; width 64 * depth
sequence_len: int = 256  # training window in tokens
batch_size: int = 16  # windows per step (per rank under DDP)
steps: int = 800  # optimiser steps
lr: float = 0.003  # AdamW peak learning rate
warmup: int = 50  # linear warm-up steps
eval_every: int = 200  # steps between validation bits-per-byte measurements
eval_tokens: int = 32768  # validation tokens per evaluation
copy_random: float = 0.0  # share of the copy windows whose spans are random token ids instead of prose (induction forms on them in a few hundred steps: benchmarks/bench_copy.py)
copy_fraction: float = 0.0  # fraction of training windows that repeat a passage (span, BOS, the same span): builds the copy (induction) heads a frozen LM needs to read soft tokens as words (issue 10)
seed: int = 0  # fixes init, batches and samples
device: str = 'auto'  # auto | cpu | cuda
dtype: str = 'bfloat16'  # autocast on CUDA; CPU runs float32
ckpt_every: int = 100  # steps between resumable checkpoints (when ckpt_dir is set)
mlflow_run_id: str = ""  # MLflow run to log into; empty: start a new run in the default store
out_dir: str = "reports/pretrain_lm/adhoc"  # folder this run writes its files into

# %%
import matplotlib.pyplot as plt
from IPython.display import display

from omni import params, track
from omni.experiments import plots
from omni.experiments.pretrain_lm import PretrainConfig, pretrain

cfg = params.from_params(PretrainConfig, globals(), ckpt_dir=f"{out_dir}/ckpt")  # a rerun in this folder resumes
tracker = track.open_run("pretrain_lm", mlflow_run_id, cfg, {"out_dir": out_dir})
res = pretrain(cfg, tracker)
print(f"train tokens {res.n_train_tokens:,}; {res.history.seconds:.0f} s; validation {res.val_bpb:.3f} bits/byte")

# %%
fig = plots.loss_curves({"train": res.history.loss}, title=f"LM pretraining: depth {cfg.depth}, {cfg.tokenizer} {cfg.vocab_size}")
tracker.log_figure(fig, "loss.png")
display(fig)
plt.close(fig)

# %%
evals = res.history.evals
fig = plots.curve([e["step"] + 1 for e in evals], [e["val_bpb"] for e in evals], xlabel="step", ylabel="bits per byte", title="validation bits per byte")
tracker.log_figure(fig, "val_bpb.png")
display(fig)
plt.close(fig)

# %% [markdown]
# ## Can it copy from its context?
# A frozen LM reads soft audio tokens only as well as it can read (and repeat) what stands before
# it: the second reading of a validation passage should cost far fewer nats than the first.

# %%
steps = [e["step"] + 1 for e in evals]
fig = plots.curve(steps, [e["copy_nats"] for e in evals], xlabel="step", ylabel="nats per token, second reading",
                  title="copying from context (lower: the LM repeats what it just read)",
                  hline=res.first_nats, hline_label="first reading, end of training")
tracker.log_figure(fig, "copy_nats.png")
display(fig)
plt.close(fig)
print(f"validation passages: {res.first_nats:.2f} nats/token read once, {res.copy_nats:.2f} nats/token read again right after "
      f"(copy_fraction={cfg.copy_fraction})")

# %% [markdown]
# ## Samples (temperature 0.8, top-k 50)

# %%
for s in res.samples:
    print("·", s.replace("\n", " "), "\n")

# %%
assert res.val_bpb < 8.0, "validation bits per byte above the 8 bits a byte costs uncompressed: the LM learned nothing"
tracker.finish()
