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
# # 05 · Ablation report: the grid, compared
# Runs last, in the grid's parent run. Every number below comes from `mlflow.search_runs` over the
# parent's children (mean ± std over seeds); the findings are computed from that table, not typed.

# %% tags=["parameters"]
reference = ""  # row the content findings compare against, empty: the last state for a layer grid, else the first grid value
mlflow_run_id = ""
out_dir = "reports/ablation/adhoc"

# %%
import math
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a kernel without ipywidgets

import numpy as np
import pandas as pd

from omni import ablation, track

assert mlflow_run_id, "run me through `omni run` with a grid: I read the children of the parent run"
tracker = track.attach(mlflow_run_id)
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
runs = ablation.child_runs(mlflow_run_id)
grid = ablation.grid_axes(mlflow_run_id)
by = [k for k in grid if k != "seed"] or ["seed"]
n_states = int(runs["metrics.data.n_states"].max()) if "metrics.data.n_states" in runs else None
table = ablation.comparison(runs, by, order=ablation._layer_order(grid, n_states))
table.to_csv(out / "comparison.csv")
tracker.log_artifact(out / "comparison.csv")
failed = runs[runs["status"] != "FINISHED"]
print(f"{len(runs)} child runs ({len(failed)} not finished), grouped by {by}: {len(table)} rows; "
      f"seeds per row: {sorted(set(table['n_runs']))}; encoder states: {n_states}")
is_layer_grid = by == ["layer"]
ref = reference or ((ablation.last_row(table, n_states) or "last") if is_layer_grid else str(grid[by[0]][0]))
findings: list[ablation.Finding] = []


def fmt(col: str) -> pd.Series:
    sd = table[col + ".std"] if col + ".std" in table else pd.Series(np.nan, index=table.index)
    return pd.Series([f"{m:.3f}" + ("" if math.isnan(s) else f" ± {s:.3f}") for m, s in zip(table[col], sd)], index=table.index)


# %% [markdown]
# ## Texture probes per layer choice

# %%
probe_cols = [c for c in table.columns if c.startswith("probe.") and c.split(".")[2] in ("linear", "attention", "chance")
              and not c.endswith(".std")]
if probe_cols and n_states:
    fig = ablation.plot_probes(table, n_states)
    tracker.log_figure(fig, "probes.png")
    for split in ablation.EVAL_SPLITS:
        cols = [f"probe.{a}.{p}.{split}" for a in ablation.ATTRIBUTES for p in (*ablation.PROBES, "chance")]
        cols = [c for c in cols if c in probe_cols]
        if cols:
            t = pd.DataFrame({c[len("probe."):-len(split) - 1]: fmt(c) for c in cols})
            print(f"\n{split.replace('_', ' ')}: accuracy per layer choice (chance = majority class of the test set)")
            display(t.T)
    findings += ablation.probe_findings(table, n_states)
else:
    print("no probe metrics in this grid")

# %% [markdown]
# ## Content: held-out WER, CER and loss after projector-only alignment

# %%
content_cols = [c for c in ("content.wer", "content.cer", "content.test_loss", "content.wer_seen_voice", "content.control_wer")
                if c in table.columns]
if content_cols:
    extra = [c for c in ("content.audio_tokens_per_s", "content.tokens_per_s", "content.step_seconds", "content.train_seconds")
             if c in table.columns]
    shown = content_cols if is_layer_grid else content_cols[:3] + extra[:2]  # projector grids: the speed beside the WER
    fig = ablation.plot_metrics(table, shown, "content (held-out, unseen voices): mean ± std over seeds", xlabel=" / ".join(by))
    tracker.log_figure(fig, "content.png")
    display(pd.DataFrame({c: fmt(c) for c in content_cols + extra} | {"seeds": table["n_runs"]}))
    singles = list(ablation.single_states(table, n_states)) if is_layer_grid and n_states else None
    findings += ablation.content_findings(table, ref, "content.wer", candidates=singles)
    findings += ablation.content_findings(table, ref, "content.test_loss", candidates=singles)
    if is_layer_grid:  # and the learned mixes against the reference
        findings += ablation.content_findings(table, ref, "content.wer", candidates=[w for w in ablation.WEIGHTED if w in table.index])
    else:  # what each variant costs: audio tokens the LM reads per second of speech, training throughput
        findings += ablation.content_findings(table, ref, "content.tokens_per_s", lower_is_better=False)
        findings += [ablation.Finding(f"{v}: {table.loc[v, 'content.audio_tokens_per_s']:.1f} audio tokens per second of speech, "
                                      f"{table.loc[v, 'content.tokens_per_s']:.0f} training tokens/s, WER {table.loc[v, 'content.wer']:.3f}", {})
                     for v in table.index if "content.audio_tokens_per_s" in table.columns and "content.tokens_per_s" in table.columns]
else:
    print("no content metrics in this grid")

# %% [markdown]
# ## Learned layer weights: content objective vs texture objectives

# %%
weighted_rows = [w for w in ablation.WEIGHTED if "layer" in by and w in table.index]
for w in weighted_rows:
    child = runs[(runs["params.layer"] == w) & (runs["status"] == "FINISHED")].sort_values("params.seed").iloc[0]
    hist = {"content (alignment)": ablation.weight_history(child.run_id, "content.layer_weight.", n_states)}
    hist |= {f"texture: {a}": ablation.weight_history(child.run_id, f"probe.{a}.weight.", n_states) for a in ablation.ATTRIBUTES}
    hist = {k: v for k, v in hist.items() if v}
    if hist:
        fig = ablation.plot_weight_histories(hist, f"{w}: layer weights vs training step (seed {child['params.seed']})")
        tracker.log_figure(fig, f"weights_history_{w}.png")
    finals = {"content": ablation.weights_of(table, w, "content.layer_weight.", n_states)}
    finals |= {a: ablation.weights_of(table, w, f"probe.{a}.weight.", n_states) for a in ablation.ATTRIBUTES}
    finals = {k: v for k, v in finals.items() if v is not None}
    if finals:
        fig = ablation.plot_weights(finals, f"{w}: final layer weights (mean over seeds)")
        tracker.log_figure(fig, f"weights_final_{w}.png")
if n_states:
    findings += ablation.weight_findings(table, n_states)

# %% [markdown]
# ## Cost

# %%
times = {c: runs[f"metrics.{c}"].mean() for c in ("time.total", "time.probes", "time.content", "time.prepare", "time.probe.linear",
                                                  "time.probe.attention") if f"metrics.{c}" in runs}
wall = (runs["end_time"].max() - runs["start_time"].min()).total_seconds()
parent_start = pd.Timestamp(track.client().get_run(mlflow_run_id).info.start_time, unit="ms", tz="UTC")
total = (pd.Timestamp.now(tz="UTC") - parent_start).total_seconds()
cost = {"grid.wall_seconds": wall, "grid.total_seconds": total, "grid.n_runs": float(len(runs)), "grid.n_failed": float(len(failed))}
cost |= {f"grid.mean_{k}": v for k, v in times.items()}
print(f"grid: {len(runs)} runs in {wall / 60:.1f} min of wall time (first child start to last child end); "
      f"{total / 60:.1f} min from the parent run's start to this cell")
for k, v in times.items():
    ran = int(runs[f"metrics.{k}"].notna().sum()) if f"metrics.{k}" in runs else 0
    print(f"  mean {k}: {v:.2f} s" + (" per probe (one attribute, both splits)" if k.startswith("time.probe.") else f" over the {ran} points that ran it"))
tracker.log_metrics(cost)

# %% [markdown]
# ## Findings (computed from the table above)

# %%
text = "\n".join(f"- {f.text}" for f in findings) or "- (no findings: the grid holds neither probes nor content)"
print(text)
(out / "findings.md").write_text(f"# Findings: {', '.join(by)} grid ({len(runs)} runs)\n\n{text}\n")
tracker.log_artifact(out / "findings.md")
tracker.log_metrics({k: v for f in findings for k, v in f.metrics.items() if not (isinstance(v, float) and math.isnan(v))})
tracker.flush()

# %%
# the table is the children's metrics: re-derive one column from the raw runs and compare
check = [c for c in ("content.wer", "probe.gender.linear.seen_voice") if c in table.columns][:1]
for c in check:
    raw = runs[runs["status"] == "FINISHED"].groupby([f"params.{b}" for b in by])[f"metrics.{c}"].mean()
    for key, v in raw.items():
        assert abs(table.loc[key, c] - v) < 1e-12, (key, c)
assert len(failed) == 0, f"{len(failed)} grid points did not finish: {failed['run_id'].tolist()}"
