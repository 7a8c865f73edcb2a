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
# # 04 · Ablation, one grid point: what does this Whisper layer choice (or audio path) carry?
# **Texture**: probes for voice identity, gender, accent, rate, pitch and style, fit on the train
# split, scored on held-out sentences by seen voices (`test_seen_voice`) and, except identity, by
# unseen voices (`test`), with the majority-class chance beside each. For `weighted` / `weighted_ln`
# the linear probe learns the softmax layer weights jointly with the classifier. **Content**:
# projector-only alignment into the frozen LM at a fixed budget: held-out WER, CER and loss.
# Everything reads the feature cache: Whisper does not run here. The grid's comparison is
# notebook 05, in the parent run. The parameters are `omni.ablation.AblationConfig`'s fields:
# the alignment's own (omni.align.AlignConfig) plus the probes'.

# %% tags=["parameters"]
corpus = "data/synth"  # synthesized corpus folder (built if it has no manifest)
sentences = 3000  # corpus size, only used when the corpus has to be built
features = "cache/features"  # feature cache root
encoder = "tiny.en"  # Whisper source
encoder_mode = "var"  # var | pad30
lm = "runs/lm"  # frozen pretrained LM folder
layer = "last"  # <state index> | last | middle | weighted | weighted_ln
k = 4  # frames per audio token
projector = "stack"  # stack | conv | avg
steps = 150  # alignment steps of the content arm, 0 for no content measurement
batch_size = 16
lr = 2e-3
warmup = 20
eval_every = 0  # alignment evaluations every this many steps, 0 for only at the end
weights_every = 20  # ... for weighted choices: each evaluation records the content layer weights
eval_clips = 8  # clips decoded per intermediate evaluation: only the curves use them
test_clips = 100  # held-out clips decoded at the end (split test, unseen voices)
seen_clips = 0  # ... and of split test_seen_voice
max_new_tokens = 60  # decoding budget per clip, in LM tokens
probes = "linear,attention"  # which texture probes, empty for none
probe_seeds = 1  # probes run for seeds below this: the linear probes are deterministic
attributes = "voice,gender,accent,rate,pitch,style"
attn_stride = 4  # the attention probe reads frames averaged in runs of this many (4: 12.5 per second)
attn_steps = 200
weighted_steps = 100  # L-BFGS iterations of the joint texture probe: layer weights and classifier
seed = 0
device = "cpu"
threads = 1  # torch threads: 1 is fastest on a shared 2-core box
mlflow_run_id = ""
out_dir = "reports/layer_ablation/adhoc"

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a kernel without ipywidgets
from IPython.display import display

from omni import ablation, plots, track

cfg = ablation.AblationConfig(**{f: globals()[f] for f in ablation.AblationConfig.__dataclass_fields__ if f in globals()})
tracker = track.attach(mlflow_run_id)
res = ablation.run_point(cfg, tracker, run_id=mlflow_run_id)

# %% [markdown]
# `last` and `middle` name a state that the grid usually also holds by its index: when that run
# (same seed, same settings) has finished, its metrics are this run's, copied rather than recomputed.
# ## Texture probes

# %%
if res.alias_of:
    print(f"metrics copied from run {res.alias_of}")
if res.probes is not None:
    m = res.probes.metrics()
    print("seconds per probe: " + ", ".join(f"{p} {m[f'time.probe.{p}']:.2f}" for p in ("linear", "attention") if f"time.probe.{p}" in m))
    display(res.probes.table().style.format(precision=3))
if res.probes is not None and res.probes.history:
    fig = plots.weight_histories(res.probes.history, f"{layer}: texture-objective layer weights vs probe step")
    tracker.log_figure(fig, "texture_weights.png")

# %% [markdown]
# ## Content: projector-only alignment at a fixed budget

# %%
if res.content is not None:
    s = res.content.scores
    seen = f"; seen voices WER {s['wer_seen_voice']:.3f}" if "wer_seen_voice" in s else ""
    print(f"held-out (unseen voices): WER {s['wer']:.3f}, CER {s['cer']:.3f}, loss {s['test_loss']:.3f}{seen}; "
          f"shuffled-audio control WER {s['control_wer']:.3f}")
    print(f"{s['audio_tokens_per_s']:.1f} audio tokens per second of speech; training {s['tokens_per_s']:.0f} tokens/s, "
          f"{s['step_seconds']:.3f} s/step")
    assert len(res.content.history.loss) == steps, "alignment did not run its budget"
if hist := ablation.weight_histories(res):
    fig = plots.weight_histories(hist, f"{layer}: layer weights vs training step, by objective")
    tracker.log_figure(fig, "layer_weights.png")
print(f"grid point: {res.seconds['total']:.1f} s in all")
