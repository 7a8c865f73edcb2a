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
# # 03 · Alignment: a frozen LM hears through a projector alone
# Whisper and the pretrained LM are **frozen**; only the layer choice and the projector train, on
# cached Whisper states of the synthesized corpus. The held-out split has sentences *and* voices
# never seen in training. Whisper's own decoder on the same clips is the yardstick; the control
# decodes each clip with another clip's audio.

# %% tags=["parameters"]
corpus = "data/synth"
sentences = 3000
features = "cache/features"
encoder = "tiny.en"
encoder_mode = "var"
lm = "runs/lm"
layer = "last"
k = 4
projector = "stack"
prompt = ""
prompt_position = "after"
trainable = "projector"
steps = 1000
batch_size = 32
lr = 2e-3
warmup = 50
eval_every = 250
eval_clips = 100
seed = 0
device = "auto"
whisper_baseline = True
mlflow_run_id = ""
out_dir = "reports/alignment/adhoc"

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from omni import metrics, plots, track
from omni.align import AlignConfig, run_alignment

cfg = AlignConfig(corpus=corpus, sentences=sentences, features=features, encoder=encoder, encoder_mode=encoder_mode,
                  lm=lm, layer=str(layer), k=k, projector=projector, prompt=prompt, prompt_position=prompt_position, trainable=trainable,
                  steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, eval_every=eval_every,
                  eval_clips=eval_clips, seed=seed, device=device, whisper_baseline=whisper_baseline,
                  out=f"{out_dir}/model")
tracker = track.attach(mlflow_run_id)
res = run_alignment(cfg, tracker)
s = res.scores

# %% [markdown]
# ## Held-out results (unseen sentences, unseen voices)

# %%
rows = [("aligned (projector only)", s["wer"], s["cer"])]
if "whisper_wer" in s:
    rows.append((f"Whisper {encoder} decoder", s["whisper_wer"], s["whisper_cer"]))
rows.append(("control: shuffled audio", s["control_wer"], float("nan")))
table = pd.DataFrame(rows, columns=["system", "WER", "CER"]).set_index("system")
print(f"held-out clips: {s['n_test']}, test loss {s['test_loss']:.3f}, WER on test sentences with seen voices: {s.get('wer_seen_voice', float('nan')):.3f}")
table.style.format("{:.3f}")

# %% [markdown]
# ## Training curves

# %%
fig = plots.loss_curves({"train loss": res.history.loss}, title=f"alignment: layer {layer}, k={k}, {projector}")
tracker.log_figure(fig, "loss.png")
display(fig)
plt.close(fig)

# %%
fig = plots.curve([st for st, _ in res.wer_curve], [w for _, w in res.wer_curve], xlabel="step", ylabel="held-out WER",
                  title=f"WER on {eval_clips} held-out clips vs training steps",
                  hline=s.get("whisper_wer"), hline_label=f"Whisper {encoder}")
tracker.log_figure(fig, "wer_curve.png")
display(fig)
plt.close(fig)

# %% [markdown]
# ## Where it fails: WER by voice, rate and pitch

# %%
per = metrics.per_utterance_wer(res.test["refs"], res.test["hyps"])
labels = pd.DataFrame([r["labels"] for r in res.test["rows"]])
labels["wer"] = per
fig = plots.bars_by(labels, ["variant", "accent", "rate_bucket", "pitch_bucket", "style"], "wer", title="held-out WER by label")
tracker.log_figure(fig, "wer_by_label.png")
display(fig)
plt.close(fig)

# %% [markdown]
# ## Examples

# %%
for i in range(min(8, len(res.test["refs"]))):
    print(f"ref:     {res.test['refs'][i]}\nours:    {res.test['hyps'][i]}")
    if "whisper_hyps" in res.test:
        print(f"whisper: {res.test['whisper_hyps'][i]}")
    print(f"control: {res.test['control_hyps'][i]}\n")

# %%
print(f"train {s['train_seconds']:.0f} s ({s['step_seconds']:.3f} s/step, {s['tokens_per_s']:.0f} tokens/s), "
      f"decode {1000 * s['decode_seconds_per_clip']:.0f} ms/clip, skipped steps {s['skipped_steps']:.0f}")
assert s["control_wer"] > s["wer"], "the aligned model does no better with the right audio than with shuffled audio"
