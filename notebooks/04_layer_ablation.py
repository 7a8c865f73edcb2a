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
# # 04 · Layer ablation, one grid point: what does this Whisper layer choice carry?
# **Texture**: probes for voice identity, gender, accent, rate, pitch and style, fit on the train
# split, scored on held-out sentences by seen voices and (except identity) by unseen voices, with
# the majority-class chance beside each. For `weighted` / `weighted_ln` the linear probe learns the
# softmax layer weights jointly with the classifier. **Content**: projector-only alignment into the
# frozen LM at a fixed budget: held-out WER, CER and loss. Everything reads the feature cache:
# Whisper does not run here. The grid's comparison is notebook 05, in the parent run.

# %% tags=["parameters"]
corpus = "data/synth"  # synthesized corpus folder (built if it has no manifest)
sentences = 3000  # corpus size, only used when the corpus has to be built
features = "cache/features"  # feature cache root
encoder = "tiny.en"
encoder_mode = "var"  # var | pad30
layer = "last"  # <state index> | last | middle | weighted | weighted_ln
seed = 0
variant = ""  # overrides of parameters in this cell, comma-separated, written as for -p: the projector grid axis
probes = "linear,attention"  # which texture probes, empty for none
probe_seeds = 1  # probes run for seeds below this: the linear probes are deterministic, so one seed is the default
attributes = "voice,gender,accent,rate,pitch,style"
attn_stride = 4  # the attention probe reads frames averaged in runs of this many (4: 12.5 per second)
attn_steps = 200
weighted_steps = 100  # L-BFGS iterations of the joint texture probe: layer weights and classifier
content_steps = 150  # alignment steps, 0 for no content measurement
lm = "runs/lm"  # frozen pretrained LM folder
k = 4  # frames per audio token
projector = "stack"  # stack | conv | avg
batch_size = 16
lr = 2e-3
warmup = 20
eval_every = 0  # alignment evaluations every this many steps, 0 for only at the end
weights_every = 20  # ... for weighted choices: each evaluation records the content layer weights
eval_clips = 8  # clips decoded per intermediate evaluation: only the curves use them
test_clips = 100  # held-out clips decoded at the end (unseen voices)
seen_clips = 0  # ... and with seen voices
max_new_tokens = 60  # decoding budget per clip, in LM tokens
device = "cpu"
threads = 1  # torch threads: 1 is fastest on a shared 2-core box
mlflow_run_id = ""
out_dir = "reports/layer_ablation/adhoc"

# %%
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a kernel without ipywidgets
import pandas as pd
import torch
import yaml

from omni import ablation, track

t_start = time.perf_counter()
for item in filter(None, (s.strip() for s in str(variant).split(","))):
    name, value = item.split("=", 1)
    assert name.strip() in globals() and name.strip() not in ("mlflow_run_id", "out_dir", "variant"), f"variant: unknown parameter {name!r}"
    globals()[name.strip()] = yaml.safe_load(value)
layer = str(layer)
torch.set_num_threads(threads)
tracker = track.attach(mlflow_run_id)
effective = dict(layer=layer, k=k, projector=projector, encoder_mode=encoder_mode, seed=seed, content_steps=content_steps)
tracker.log_params(effective)  # the runner logged the grid values; this adds what `variant` set
print("effective:", effective)

t0 = time.perf_counter()
cache_path = ablation.prepare(corpus, sentences, encoder, encoder_mode, features)
cache = ablation.FeatureCache.open(cache_path)
built = (cache_path / "index.json").stat().st_mtime >= time.time() - (time.perf_counter() - t0)
splits = pd.Series([r["labels"]["split"] for r in cache.rows]).value_counts()
tracker.log_metrics({"time.prepare": time.perf_counter() - t0, "data.cache_built_here": float(built),
                     "data.n_states": cache.n_states, "data.n_clips": len(cache)})
print(f"cache {cache_path}: {len(cache)} clips, {cache.n_states} states x {cache.d_model}, "
      f"{'BUILT in this run' if built else 'read from cache'}; splits: {splits.to_dict()}")

# %% [markdown]
# `last` and `middle` name a state that the grid usually also holds by its index: when that run
# (same seed, same settings) has finished, its metrics are this run's, copied rather than recomputed.

# %%
alias = ablation.alias_source(mlflow_run_id, layer, cache.n_states)
if alias:
    copied = ablation.copy_run_metrics(alias, tracker)
    print(f"{layer} = state {ablation.choice_index(layer, cache.n_states)}: {len(copied)} metrics copied from run {alias}")

# %% [markdown]
# ## Texture probes

# %%
probe_kinds = [p for p in str(probes).split(",") if p.strip()] if seed < probe_seeds and not alias else []
probe_res = None
if probe_kinds:
    t0 = time.perf_counter()
    probe_res = ablation.run_probes(cache, layer, [a.strip() for a in attributes.split(",")], seed=seed,
                                    probes=probe_kinds, attn_stride=attn_stride, attn_steps=attn_steps,
                                    weighted_steps=weighted_steps)
    probe_res.log(tracker)
    tracker.log_metrics({"time.probes": time.perf_counter() - t0})
    m = probe_res.metrics()
    rows = []
    for a in ablation.ATTRIBUTES:
        for split in ablation.EVAL_SPLITS:
            if f"probe.{a}.chance.{split}" in m:
                rows.append({"attribute": a, "split": split, **{p: m.get(f"probe.{a}.{p}.{split}") for p in (*probe_kinds, "chance")},
                             "n_test": m[f"probe.{a}.n_test.{split}"]})
    print(f"seconds per probe: " + ", ".join(f"{p} {m[f'time.probe.{p}']:.2f}" for p in probe_kinds if f"time.probe.{p}" in m))
    display(pd.DataFrame(rows).set_index(["attribute", "split"]).style.format(precision=3))

# %%
if probe_res is not None and probe_res.history:
    fig = ablation.plot_weight_histories(probe_res.history, f"{layer}: texture-objective layer weights vs probe step")
    tracker.log_figure(fig, "texture_weights.png")

# %% [markdown]
# ## Content: projector-only alignment at a fixed budget

# %%
content = None
if content_steps > 0 and not alias:
    t0 = time.perf_counter()
    content = ablation.run_content(cache, tracker, test_clips=test_clips, seen_clips=seen_clips,
                                   corpus=corpus, features=features, encoder=encoder, encoder_mode=encoder_mode, lm=lm,
                                   layer=layer, k=k, projector=projector, steps=content_steps, batch_size=batch_size,
                                   lr=lr, warmup=warmup, eval_every=weights_every if layer in ablation.WEIGHTED else eval_every,
                                   eval_clips=eval_clips, max_new_tokens=max_new_tokens, seed=seed, device=device)
    tracker.log_metrics({"time.content": time.perf_counter() - t0})
    s = content.scores
    seen = f"; seen voices WER {s['wer_seen_voice']:.3f}" if "wer_seen_voice" in s else ""
    print(f"held-out (unseen voices): WER {s['wer']:.3f}, CER {s['cer']:.3f}, loss {s['test_loss']:.3f}{seen}; "
          f"shuffled-audio control WER {s['control_wer']:.3f}")
    print(f"{s['audio_tokens_per_s']:.1f} audio tokens per second of speech; training {s['tokens_per_s']:.0f} tokens/s, "
          f"{s['step_seconds']:.3f} s/step")

# %%
if content is not None and content.layer_weights_history and layer in ablation.WEIGHTED:
    hist = {"content objective (alignment)": [(st, w) for (st, _), w in zip(content.wer_curve, content.layer_weights_history)]}
    if probe_res is not None:
        hist |= {f"texture: {a}": h for a, h in probe_res.history.items()}
    fig = ablation.plot_weight_histories(hist, f"{layer}: layer weights vs training step, by objective")
    tracker.log_figure(fig, "layer_weights.png")

# %% [markdown]
# ## Cost

# %%
total = time.perf_counter() - t_start
tracker.log_metrics({"time.total": total})
tracker.flush()
print(f"grid point: {total:.1f} s in all")
if probe_res is not None:
    assert all(0.0 <= v <= 1.0 for (a, p, s), v in probe_res.scores.items() if p in ("linear", "attention", "chance")), "accuracy outside [0, 1]"
if content is not None:
    assert len(content.history.loss) == content_steps, "alignment did not run its budget"
