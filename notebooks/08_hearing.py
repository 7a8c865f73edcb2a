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
# # 08 · Hearing: how much of the LM must move?
# Runs last, in the grid's parent run. Each row is one alignment run of the grid (notebook 03): what
# trained beside the projector (nothing, LoRA adapters, the whole LM), or the committed hearing model
# evaluated as it is. Every column is measured on the same clear held-out clips (voices and sentences
# never seen in training): the LM's own greedy transcript and the joint CTC/LM beam search, each beside
# the same decoding with shuffled audio, what the audio tokens spell with no LM (CTC readout), CER and
# Whisper tiny.en's own decoder. Rows the grid did not train come from the committed model's
# provenance, and say so.

# %% tags=["parameters"]
model: str = "models/hear"  # committed model whose provenance fills in the arms this grid did not train ("" = none)
mlflow_run_id: str = ""  # the grid's parent run (given by `omni run`): its children are the rows
out_dir: str = "reports/hearing/adhoc"  # folder this run writes its files into

# %%
from pathlib import Path

from omni import track
from omni.experiments import hearing, plots

assert mlflow_run_id, "run me through `omni run` with a grid: I read the children of the parent run"
tracker = track.attach(mlflow_run_id)
table = hearing.axis_table(mlflow_run_id, model)
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
table.to_csv(out / "trainable_axis.csv")
tracker.log_artifact(out / "trainable_axis.csv")

# %% [markdown]
# ## The answer

# %%
print(hearing.verdict(table))
plots.table(table)

# %% [markdown]
# ## The same, as a picture
# Lower is better; a row whose joint bar is not far below its shuffled-audio bar does not listen.

# %%
plots.show(tracker, plots.grouped_bars(table, ["joint WER", "joint, shuffled audio", "greedy WER", "CTC readout WER"],
                                       hline=hearing.WHISPER_CLEAR, hline_label="Whisper tiny.en", ylabel="clear held-out WER"),
           "trainable_axis.png")
tracker.finish()  # the parent run is the runner's: this flushes, and ends nothing
