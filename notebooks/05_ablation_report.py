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
# ---

# %% [markdown]
# # 05 · Ablation report: the grid, compared
# Runs last, in the grid's parent run. Every number below comes from `mlflow.search_runs` over the
# parent's children (mean ± std over seeds, `omni.eval.compare.summarize`); the findings are computed
# from that table (`omni.eval.findings`), not typed.

# %% tags=["parameters"]
reference: str = ""  # row the content findings compare against; empty: the last state for a layer grid, else the first point
mlflow_run_id: str = ""  # the grid's parent run (given by `omni run`): its children are compared
out_dir: str = "reports/ablation/adhoc"  # folder this run writes its files into

# %%
from pathlib import Path

from IPython.display import display

from omni import track
from omni.eval import compare
from omni.eval.layer_probes import EVAL_SPLITS
from omni.experiments import plots

assert mlflow_run_id, "run me through `omni run` with a grid: I read the children of the parent run"
tracker = track.attach(mlflow_run_id)
out = Path(out_dir)
grid = compare.summarize(mlflow_run_id, reference)
out.mkdir(parents=True, exist_ok=True)
grid.table.to_csv(out / "comparison.csv")
tracker.log_artifact(out / "comparison.csv")
print(f"{len(grid.runs)} child runs ({len(grid.failed)} not finished), grouped by {grid.by}: {len(grid.table)} rows; "
      f"seeds per row: {sorted(set(grid.table['n_runs']))}; encoder states: {grid.n_states}")

# %% [markdown]
# ## Texture probes per layer choice
# Accuracy per layer choice on held-out sentences by seen voices (`test_seen_voice`) and unseen
# voices (`test`); chance is the majority class of the test set.

# %%
if grid.n_states and any(c.startswith("probe.") for c in grid.table.columns):
    plots.show(tracker, plots.probe_accuracy(grid.table, grid.n_states), "probes.png")
    for split in EVAL_SPLITS:
        t = grid.probe_table(split)
        if len(t.columns):
            print(f"\n{split}: accuracy per layer choice")
            display(t.T)
else:
    print("no probe metrics in this grid")

# %% [markdown]
# ## Content: held-out WER, CER and loss after projector-only alignment

# %%
quality, cost = grid.content_columns()
if quality:
    shown = quality if grid.layer_grid else quality[:3] + cost[:2]  # projector grids: the speed beside the WER
    fig = plots.grid_metrics(grid.table, shown, "content (held-out, unseen voices): mean ± std over seeds", xlabel=" / ".join(grid.by))
    plots.show(tracker, fig, "content.png")
    display(grid.formatted(quality + cost).assign(seeds=grid.table["n_runs"]))
else:
    print("no content metrics in this grid")

# %% [markdown]
# ## Learned layer weights: content objective vs texture objectives

# %%
for w in grid.weighted_rows:
    if hist := grid.weight_histories(w):
        plots.show(tracker, plots.weight_histories(hist, f"{w}: layer weights vs training step (first seed)"), f"weights_history_{w}.png")
    if finals := grid.final_weights(w):
        plots.show(tracker, plots.final_weights(finals, f"{w}: final layer weights (mean over seeds)"), f"weights_final_{w}.png")

# %% [markdown]
# ## Cost and findings (computed from the table above)

# %%
wall, total = grid.cost["grid.wall_seconds"], grid.cost["grid.total_seconds"]
print(f"grid: {len(grid.runs)} runs in {wall / 60:.1f} min of wall time (first child start to last child end); "
      f"{total / 60:.1f} min from the parent run's start; mean seconds per point: "
      + ", ".join(f"{k[len('grid.mean_time.'):]} {v:.2f}" for k, v in grid.cost.items() if k.startswith("grid.mean_")))
print(grid.findings_markdown())
(out / "findings.md").write_text(grid.findings_markdown())
tracker.log_artifact(out / "findings.md")
tracker.log_metrics(grid.metrics())
assert not grid.failed, f"{len(grid.failed)} grid points did not finish: {grid.failed}"
tracker.finish()  # the parent run is the runner's: this flushes, and ends nothing
