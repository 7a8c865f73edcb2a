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
#     config: omni.experiments.pretrain_lm.PretrainConfig
#     derived:
#     - ckpt_dir
#     experiment: pretrain_lm
# ---

# %% [markdown]
# # 02 · Pretrain the text LM
# A BPE tokenizer and a small GPT of today's nanochat architecture trained on offline public-domain
# English (see `omni/data/LICENSES.md`), with the speech corpus's held-out sentences removed so that
# the LM cannot have memorised the transcripts alignment is scored on, and an induction curriculum so
# that it learns to copy from its context (what a frozen LM needs to read audio tokens as words).
# Validation in bits per byte.
# On a GPU box scale it with `-p depth=12 -p steps=5000 -p device=cuda`; for several GPUs use
# `torchrun --nproc_per_node N -m omni.experiments.pretrain_lm --depth 12 ...`.

# %% tags=["parameters"]
# generated from omni.experiments.pretrain_lm.PretrainConfig by `python -m omni.params`: edit the dataclass, not this cell
out: str = 'runs/lm'  # where the LM folder is written
sources: str = 'all'  # "all" (every installed source) or comma-separated names of omni.data.text sources
tokenizer: str = 'bpe'  # bpe | byte
vocab_size: int = 4096  # BPE vocabulary (ignored for byte)
depth: int = 4  # GPT depth; width 64 * depth
head_dim: int = 64  # width of an attention head (the width divided by it gives the number of heads)
arch: str = 'nanochat'  # nanochat (today's: lambdas, value embeddings, backout, RoPE 100k, q/k x 1.2) | gpt (omni's January GPT)
smear: bool = True  # mix the previous token's embedding into each position (nanochat's smear)
sequence_len: int = 256  # training window in tokens
batch_size: int = 16  # windows per step (per rank under DDP)
steps: int = 800  # optimiser steps
optimizer: str = 'muon'  # muon (Muon for hidden matrices, AdamW for the rest) | adamw
lr: float = 0.003  # AdamW peak learning rate (embeddings, lm_head, scalars; every parameter when optimizer is adamw)
muon_lr: float = 0.02  # Muon peak learning rate (hidden matrices)
warmup: int = 50  # linear warm-up steps
eval_every: int = 200  # steps between validation measurements (bits per byte, the copy tests)
eval_tokens: int = 32768  # validation tokens per evaluation
induction: float = 0.5  # share of synthetic induction windows (random tokens, spans repeated at varied distances) at step 0
induction_floor: float = 0.05  # share kept after the anneal, so the skill is never unlearned
induction_steps: int = 300  # steps over which the share goes linearly from `induction` to `induction_floor`
repeat_fraction: float = 0.5  # share of prose windows whose passages repeat verbatim at varied distances
repeat_noise: float = 0.0  # share of a repeated span's source tokens (first occurrence) replaced by random ids: copying that survives a misspelt source, as an audio readout is
induction_head: bool = True  # start layer 0, head 0 as an induction head (plant_induction_head; needs smeared keys, which it turns on)
seed: int = 0  # fixes init, batches and samples
device: str = 'auto'  # auto | cpu | cuda
dtype: str = 'bfloat16'  # autocast on CUDA; CPU runs float32
ckpt_every: int = 100  # steps between resumable checkpoints (when ckpt_dir is set)
save_dtype: str = 'float32'  # float32 | float16: precision of the saved weights (float16 halves the folder; loading computes in float32)
mlflow_run_id: str = ""  # MLflow run to log into; empty: start a new run in the default store
out_dir: str = "reports/pretrain_lm/adhoc"  # folder this run writes its files into

# %%
from omni import params, track
from omni.experiments import plots, pretrain_lm
from omni.experiments.pretrain_lm import PretrainConfig

cfg = params.from_params(PretrainConfig, globals(), ckpt_dir=f"{out_dir}/ckpt")  # a rerun in this folder resumes
tracker = track.open_run("pretrain_lm", mlflow_run_id, cfg, {"out_dir": out_dir})
res = pretrain_lm.run(cfg, tracker)
print(f"train tokens {res.n_train_tokens:,}; {res.history.seconds:.0f} s; validation {res.val_bpb:.3f} bits/byte")

# %%
plots.show(tracker, plots.loss_curves({"train": res.history.loss}, title=f"LM pretraining: depth {cfg.depth}, {cfg.tokenizer} {cfg.vocab_size}"), "loss.png")
evals = res.history.evals
plots.show(tracker, plots.curve([e["step"] + 1 for e in evals], [e["val_bpb"] for e in evals], xlabel="step", ylabel="bits per byte",
                                title="validation bits per byte"), "val_bpb.png")

# %% [markdown]
# ## Can it copy from its context?
# A frozen LM reads soft audio tokens only as well as it can read (and repeat) what stands before
# it: the second reading of a validation passage should cost far fewer nats than the first, and a
# span of random tokens read a second time should be predicted token by token.

# %%
plots.show(tracker, plots.copy_curves(evals), "copy.png")
print(f"validation passages: {res.first_nats:.2f} nats/token read once, {res.copy_nats:.2f} read again right after; "
      f"random spans read again: {res.random_copy:.0%} of the tokens predicted")

# %% [markdown]
# ## Samples (temperature 0.8, top-k 50)

# %%
for s in res.samples:
    print("·", s.replace("\n", " "), "\n")

# %%
assert res.val_bpb < 8.0, "validation bits per byte above the 8 bits a byte costs uncompressed: the LM learned nothing"
tracker.finish()
