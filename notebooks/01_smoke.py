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
#     config: omni.experiments.smoke.SmokeConfig
#     derived:
#     - ckpt_dir
#     experiment: smoke
# ---

# %% [markdown]
# # 01 · Smoke test: does the audio path train?
# Five 5-second synthetic tones, each with a caption. A frozen Whisper encoder (run once) feeds a
# projector whose audio tokens are prepended to a **random-init** GPT; projector and GPT train
# together, with cross-entropy on the caption only.
#
# A random LM can memorise five strings whatever it hears, so the loss drop alone mostly
# measures memorisation. The **control** trains the same model from the same init with the audio
# made uninformative (re-shuffled between captions every step, or zeroed). The gap between the two
# curves, in bits per caption, and how many captions greedy decoding recovers from the audio, are
# what the audio adds. The verdict needs all three: the loss drops, the audio adds at least
# `min_gap_bits` bits per caption, and more captions are decoded from the audio than by the control.

# %% tags=["parameters"]
# generated from omni.experiments.smoke.SmokeConfig by `python -m omni.params`: edit the dataclass, not this cell
steps: int = 50  # optimiser steps, full batch of all clips each step
lr: float = 0.003  # AdamW peak lr for GPT and projector
seed: int = 0  # fixes init, control shuffles and decoding
depth: int = 6  # GPT depth; width is 64 * depth (nanochat rule)
layer: str = 'last'  # Whisper state: last | middle | <index> | weighted | weighted_ln
k: int = 4  # frames per audio token
encoder: str = 'tiny.en'  # Whisper source: tiny.en (embedded), a local folder or a hub id
encoder_mode: str = 'var'  # var (variable length) | pad30
control: str = 'shuffle'  # shuffle | zero | none: how the control run hides the audio
device: str = 'auto'  # auto | cpu | cuda
manifest: str = 'data/audio_smoke/manifest.jsonl'  # the captioned clips (written on first use)
min_drop: float = 0.5  # pass needs the loss to drop by at least this much
min_gap_bits: float = 1.0  # ... and the audio to tell at least this many bits per caption beyond the control
ckpt_every: int = 10  # steps between resumable checkpoints (when ckpt_dir is set)
mlflow_run_id: str = ""  # MLflow run to log into; empty: start a new run in the default store
out_dir: str = "reports/smoke/adhoc"  # folder this run writes its files into

# %%
import math

import matplotlib.pyplot as plt

from omni import params, track
from omni.experiments import plots, smoke

cfg = params.from_params(smoke.SmokeConfig, globals(), ckpt_dir=f"{out_dir}/ckpt")  # a rerun in this folder resumes
tracker = track.open_run("smoke", mlflow_run_id, cfg, {"out_dir": out_dir})
res = smoke.run(cfg, tracker)

# %% [markdown]
# ## Loss: real audio vs the control
# Log scale: both runs memorise the captions, and the gap that the audio makes is a small
# difference between two small losses. The right panel shows that gap itself.

# %%
fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
ax.semilogy(res.real.loss, label="real audio")
if res.control is not None:
    ax.semilogy(res.control.loss, label=f"control ({cfg.control})")
    gap = [c - r for r, c in zip(res.real.loss, res.control.loss)]
    gap_ax.plot(gap, color="C2")
    gap_ax.axhline(0, color="0.6", lw=0.8)
    gap_ax.set(title="control loss - real loss (nats/token)", xlabel="step")
ax.set(title=f"smoke: depth {cfg.depth}, layer {cfg.layer}, k={cfg.k}", xlabel="step", ylabel="loss (nats/token)")
ax.legend()
fig.tight_layout()
plots.show(tracker, fig, "loss.png")

# %%
m = res.metrics()
print(f"loss {m['initial_loss']:.3f} -> {m['final_loss']:.3f}  (drop {m['loss_drop']:.3f})")
if res.control is not None:
    print(f"control final loss {m['control_final_loss']:.3f}  gap {m['control_gap']:.3f} nats/token "
          f"= {m['control_gap_bits_per_caption']:.2f} bits per caption (ceiling: log2 {len(res.texts)} = {math.log2(len(res.texts)):.2f})")
    print(f"captions decoded exactly from audio: real {m['caption_accuracy']:.0%}, control {m['control_caption_accuracy']:.0%}")
print(f"encoder {m['encode_seconds']:.1f} s, training {m['train_seconds']:.1f} s ({cfg.steps} steps)")

# %% [markdown]
# ## What the trained model says for each clip (greedy)

# %%
for ref, hyp, ctl in zip(res.texts, res.decoded, res.control_decoded or [""] * len(res.texts)):
    print(f"ref:     {ref}\nreal:    {hyp}" + (f"\ncontrol: {ctl}" if ctl else "") + "\n")

# %% [markdown]
# ## Verdict

# %%
print(res.verdict())
assert res.passed, res.verdict()
tracker.finish()
