# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Pretrain the text LM
# A BPE tokenizer and a small nanochat-style GPT trained on offline public-domain English
# (see `omni/data/LICENSES.md`), with the speech corpus's held-out sentences removed so that the
# LM cannot have memorised the transcripts alignment is scored on. Validation in bits per byte.
# On a GPU box scale it with `-p depth=12 -p steps=5000 -p device=cuda`; for several GPUs use
# `torchrun --nproc_per_node N -m omni.pretrain --depth 12 ...`.

# %% tags=["parameters"]
out = "runs/lm"
sources = "all"
tokenizer = "bpe"
vocab_size = 4096
depth = 4
sequence_len = 256
batch_size = 16
steps = 800
lr = 3e-3
warmup = 50
eval_every = 200
seed = 0
device = "auto"
mlflow_run_id = ""
out_dir = "reports/pretrain_lm/adhoc"

# %%
import matplotlib.pyplot as plt
from IPython.display import display

from omni import plots, track
from omni.pretrain import PretrainConfig, pretrain

cfg = PretrainConfig(out=out, sources=sources, tokenizer=tokenizer, vocab_size=vocab_size, depth=depth,
                     sequence_len=sequence_len, batch_size=batch_size, steps=steps, lr=lr, warmup=warmup,
                     eval_every=eval_every, seed=seed, device=device)
tracker = track.attach(mlflow_run_id)
res = pretrain(cfg, tracker)
print(f"train tokens {res.n_train_tokens:,}; {res.history.seconds:.0f} s; validation {res.val_bpb:.3f} bits/byte")

# %%
fig = plots.loss_curves({"train": res.history.loss}, title=f"LM pretraining: depth {depth}, {tokenizer} {vocab_size}")
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
# ## Samples (temperature 0.8, top-k 50)

# %%
for s in res.samples:
    print("·", s.replace("\n", " "), "\n")

# %%
assert res.val_bpb < 8.0, "validation bits per byte above the 8 bits a byte costs uncompressed: the LM learned nothing"
