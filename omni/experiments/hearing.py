"""The trainable axis: how much of the LM must move before the model hears? One table from a grid of
alignment runs (notebook 08, the summary of experiments/hearing.yaml and of the tour).

Each row is one run of the grid (omni.experiments.alignment, notebook 03): what trained (projector
only, projector + LoRA, projector + the whole LM), or the committed hearing model evaluated as it is
(`steps=0, run=models/hear`). Its columns are the same 202-odd clear held-out clips (unseen voices and
sentences) decoded greedy (the LM alone, under the loop guard) and joint (CTC/LM beam search), each
beside its shuffled-audio control, what the audio tokens spell alone (CTC readout), CER, Whisper's own
decoder and the training time. Every number is a child run's MLflow metric; the verdict sentence is
computed from them.

Rows the grid did not run can come from the committed model's provenance (models/hear/provenance.json:
the table its research run measured), marked as such, so the tour shows the whole axis at its budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from omni.eval.compare import child_runs
from omni.experiments.audio_run import run_meta

ARMS = {"projector": "projector only (frozen LM)", "projector+lora": "projector + LoRA", "projector+lm": "projector + the whole LM"}
COLUMNS = {  # table column -> the child run's metric (clear held-out speech)
    "greedy WER": "clear_greedy_wer", "greedy, shuffled audio": "clear_greedy_control_wer",
    "joint WER": "clear_joint_wer", "joint, shuffled audio": "clear_joint_control_wer",
    "CTC readout WER": "clear_ctc_wer", "joint CER": "clear_joint_cer", "greedy CER": "clear_greedy_cer",
    "Whisper WER": "clear_whisper_wer", "CTC weight": "ctc_decode_weight_chosen", "train s": "train_seconds",
}
WHISPER_CLEAR = 0.454  # Whisper tiny.en (guarded) on the default corpus's 202 clear held-out clips: omni/eval/baselines


def row_label(params: dict) -> str:
    """What a run is, for a person: its trainable arm, or the committed model it evaluated."""
    arm = ARMS.get(params.get("trainable", "projector"), params.get("trainable", "?"))
    if str(params.get("steps")) == "0" and params.get("run"):
        return f"{Path(params['run']).name} (committed, evaluated as it is)"
    return arm


def grid_table(parent_run_id: str) -> pd.DataFrame:
    """One row per FINISHED child run of the grid, COLUMNS as columns (NaN where a run has no such figure)."""
    runs = child_runs(parent_run_id)
    runs = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    rows = []
    for _, r in runs.sort_values("start_time").iterrows():
        params = {k[len("params."):]: v for k, v in r.items() if k.startswith("params.") and isinstance(v, str)}
        row = {"system": row_label(params), "source": "measured in this run"}
        row |= {col: float(r.get(f"metrics.{m}", math.nan)) for col, m in COLUMNS.items()}
        rows.append(row)
    return pd.DataFrame(rows).set_index("system") if rows else pd.DataFrame(columns=["source", *COLUMNS]).rename_axis("system")


def run_rows(folders: list[str | Path]) -> pd.DataFrame:
    """The table's rows from saved runs (each folder's audio_path.json: its config and scores), e.g. the
    arms of a grid evaluated again with their CTC weight chosen on the val split (steps=0, run=ARM)."""
    rows = []
    for folder in folders:
        path, meta = run_meta(folder)
        cfg, scores = meta.get("config", {}), meta.get("scores", {})
        arm = run_meta(meta["started_from"])[1] if meta.get("started_from") else None  # an evaluation of an arm: the arm trained
        params = {"trainable": ((arm or {}).get("config") or cfg).get("trainable", "projector"), "steps": str(cfg.get("steps", "")), "run": ""}
        row = {"system": row_label(params), "source": f"measured: {path}"}
        row |= {col: float(scores.get(m, math.nan)) for col, m in COLUMNS.items()}
        if arm:  # its training time is the arm's own
            row["train s"] = float(arm.get("scores", {}).get("train_seconds", math.nan))
        rows.append(row)
    return pd.DataFrame(rows).set_index("system")


def provenance_rows(model_dir: str | Path) -> pd.DataFrame:
    """The trainable-axis table a committed model's research run measured (its provenance.json), marked
    with where each row was measured (the row's own source, else the provenance's run and commit);
    empty when there is none."""
    f = Path(model_dir) / "provenance.json"
    if not f.is_file():
        return pd.DataFrame()
    prov = json.loads(f.read_text())
    default = f"{prov.get('measured_by', 'its research run')} at {prov.get('commit', '?')[:9]}"
    rows = [{"system": r["system"], "source": f"committed: {r.get('source', '').removeprefix('measured: ') or default}"}
            | {col: r.get(col, math.nan) for col in COLUMNS} for r in prov.get("trainable_axis", [])]
    return pd.DataFrame(rows).set_index("system") if rows else pd.DataFrame()


def axis_table(parent_run_id: str, model_dir: str | Path = "") -> pd.DataFrame:
    """The grid's rows, then the committed rows of arms the grid did not measure itself."""
    table = grid_table(parent_run_id)
    if model_dir:
        committed = provenance_rows(model_dir)
        committed = committed[~committed.index.isin(table.index)] if len(committed) else committed
        table = pd.concat([table, committed]) if len(committed) else table
    return table


def verdict(table: pd.DataFrame, whisper: float = WHISPER_CLEAR) -> str:
    """One sentence: does the best row hear (joint WER clearly below its shuffled control), and how far
    from Whisper's own decoder on the same clips."""
    if table.empty or table["joint WER"].isna().all():
        return "No run with joint decoding finished: nothing to compare."
    best = table["joint WER"].idxmin()
    r = table.loc[best]
    w = r["Whisper WER"] if not math.isnan(r["Whisper WER"]) else whisper
    hears = r["joint, shuffled audio"] - r["joint WER"] >= 0.3 and r["joint, shuffled audio"] >= 0.9
    gap = r["joint WER"] - w
    where = f"{abs(gap):.3f} {'below' if gap < 0 else 'above'} Whisper tiny.en's own decoder ({w:.3f})"
    readout = r["CTC readout WER"]
    lm = (f"; the LM takes the audio tokens' own spelling from {readout:.3f} to {r['joint WER']:.3f}"
          if not math.isnan(readout) else "")
    return (f"{'It hears' if hears else 'It does not hear yet'}: the best row, {best}, transcribes unseen voices at WER "
            f"{r['joint WER']:.3f} with joint decoding (shuffled audio {r['joint, shuffled audio']:.3f}), {where}{lm}.")
