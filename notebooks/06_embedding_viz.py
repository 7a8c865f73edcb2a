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
#     config: omni.experiments.embedding_viz.EmbeddingVizConfig
#     experiment: embedding_viz
# ---

# %% [markdown]
# # 06 · Seeing the alignment: audio tokens among the LM's token embeddings
# For each alignment run (`run`: a folder, a report folder or an MLflow run id; comma-separate several
# runs, or give the folder of an alignment grid such as `-p layer=[last,middle,weighted]`, to compare
# layer choices), the audio tokens of held-out clips are computed with the projector
# **at its initialisation** (the run's seed and config, untrained) and **after training**, and placed
# beside the LM's own token embeddings (`GPT.embed`, what the transformer sees) in one shared 2-D map
# per run. Statistics come from every token of the sampled clips; only the map is subsampled.
# An interactive version of the maps (hover for a point's clip, word and nearest LM tokens) is written
# next to this report as `embedding_map.html`: one self-contained file, no network needed.

# %% tags=["parameters"]
# generated from omni.experiments.embedding_viz.EmbeddingVizConfig by `python -m omni.params`: edit the dataclass, not this cell
run: str = ''  # alignment run(s): folder, report folder, grid report folder or MLflow run id; comma-separated
split: str = 'test'  # held-out split(s) of the feature cache, comma-separated; "" : every clip
clips: int = 200  # held-out clips (sampled with `seed`) whose audio tokens are analysed
text_points: int = 1000  # LM token embeddings on the map: the clips' transcript tokens first
audio_points: int = 1000  # audio tokens on the map per stage (before / after), same tokens in both
umap: bool = True  # also a UMAP map (PCA is always made)
n_neighbors: int = 15  # UMAP
min_dist: float = 0.1  # UMAP
candidates: int = 100  # retrieval among this many clips (blocks of the sample; 1/candidates is chance)
topk: int = 5  # nearest LM tokens per audio token in the readout
word_timing: str = 'auto'  # auto (espeak where the clip is synthesized, else chars) | espeak | chars
validate_clips: int = 100  # clips on which `chars` timing is scored against espeak's own word times
readout_clips: int = 3  # clips shown in the nearest-token readout (the report only)
seed: int = 0  # fixes the clip sample, the map sample, the controls and UMAP
device: str = 'cpu'  # where the models run: cpu | cuda | auto
batch_size: int = 32  # clips per forward pass of the audio path
mlflow_run_id: str = ""  # MLflow run to log into; empty: start a new run in the default store
out_dir: str = "reports/embedding_viz/adhoc"  # folder this run writes its files into

# %%
import math
from pathlib import Path

from IPython.display import HTML, display

from omni import params, track
from omni.experiments import embedding_page, embedding_viz, plots

cfg = params.from_params(embedding_viz.EmbeddingVizConfig, globals())
tracker = track.open_run("embedding_viz", mlflow_run_id, cfg, {"out_dir": out_dir})
runs = embedding_viz.run(cfg, tracker)
projections = list(runs[0].map.xy)
for r in runs:
    print(f"{r.name}: {r.path}\n  {len(r.clips)} clips of split {split!r}, {sum(len(t) for t in r.tokens['after'])} audio tokens "
          f"({r.seconds_per_token * 1000:.0f} ms each), vocabulary {len(r.strings)}, "
          f"map: {int((r.map.kind == 0).sum())} LM tokens + {int((r.map.kind == 1).sum())} audio tokens per stage")

# %% [markdown]
# ## Numbers: before vs after training, per run
# `_control` rows break the pairing (each clip against another clip's transcript, or the words shuffled among
# the audio tokens): a statistic means something only where it clears its control. Retrieval is
# top-1 among `retrieval_candidates` clips (audio -> transcript and back); chance is `retrieval_chance`.
# `nn_cos` is how close an audio token sits to its nearest LM token, `text_nn_cos` the same for a
# transcript token's nearest *other* token (how tightly the table itself is packed).

# %%
table = embedding_viz.stats_table(runs)
display(table.style.format("{:.3f}"))
fig = plots.alignment_bars(runs)
plots.show(tracker, fig, "stats.png")

# %% [markdown]
# ## The shared maps
# One projection per run, fitted on the LM tokens and both stages' audio tokens together, so the
# before and after panels share coordinates. UMAP is seeded (`random_state`), which makes umap-learn
# run single-threaded: same seed, same picture.

# %%
for r in runs:
    for p in projections:
        fig = plots.embedding_map(r, p)
        plots.show(tracker, fig, f"map_{embedding_viz.slug(r.name)}_{p}.png")

# %% [markdown]
# ## Coloured by voice, gender, rate, pitch and the word being spoken

# %%
for r in runs:
    for p in projections:
        fig = plots.embedding_labels(r, p)
        plots.show(tracker, fig, f"labels_{embedding_viz.slug(r.name)}_{p}.png")

# %% [markdown]
# ## What the LM reads: nearest LM tokens of each audio token
# Under each transcript, one column per audio token: its time, the word under it, and its nearest LM
# token embeddings (cosine) after training, then before. Green: a token of that very word; pale green:
# a token of the transcript. Hover a cell for its cosine.

# %%
for r in runs:
    display(HTML(f"<h4>{r.name}</h4>" + embedding_page.readout_html(r, list(range(min(readout_clips, len(r.clips)))), k=3)))

# %% [markdown]
# ## Word timing: which word each audio token hears
# Synthesized clips are timed by espeak-ng itself (the sentence is spoken again with the clip's voice,
# rate and pitch, and espeak's word events give each onset; the re-synthesis must have the clip's exact
# length). Other clips fall back to `chars`: the clip's duration split between the words in proportion
# to their letters (+1 per word, +3 after punctuation). Below: how good `chars` is against espeak.

# %%
for r in runs:
    used = {m: sum(c.timing == m for c in r.clips) for m in ("espeak", "chars")}
    t = r.timing_check
    print(f"{r.name}: timing used {used}")
    if t.get("clips"):
        print(f"  chars vs espeak on {t['clips']} clips: {t['token_agreement']:.1%} of audio tokens get the same word, "
              f"onset error mean {1000 * t['onset_error_mean']:.0f} ms, median {1000 * t['onset_error_median']:.0f} ms")
    else:
        print("  no synthesized clips: the chars timing is unvalidated here")

# %% [markdown]
# ## Interactive map

# %%
page = embedding_page.write_interactive(Path(out_dir) / "embedding_map.html", runs,
                                        note=f"seed {seed}; UMAP with random_state runs single-threaded; split {split}, {clips} clips")
tracker.log_artifact(page)
display(HTML(f'<p>Open <a href="embedding_map.html">embedding_map.html</a> ({page.stat().st_size / 1e6:.1f} MB, works offline).</p>'))

# %%
for r in runs:
    for s in embedding_viz.STAGES:
        bad = [k for k, v in r.stats[s].items() if not math.isfinite(v)]
        assert not bad, f"{r.name} {s}: non-finite statistics {bad}"
        assert abs(r.stats[s]["rms_audio"] / r.stats[s]["rms_text"] - 1) < 0.05, "audio tokens are not at the text-embedding scale"
assert not embedding_page.remote_references(page.read_text()), "the interactive page must not load anything from the network"
tracker.finish()
