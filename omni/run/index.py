"""reports/index.html: every report folder with its status, headline metrics and MLflow run.

Design choices:
- The index is rebuilt from the report folders' summary.json files, never edited in place, and
  written atomically: a reader never sees half a page, and two runs finishing together cannot
  leave an index that lacks one of them (each rebuild reads every folder).
- Every report folder is listed: one whose summary.json is missing or unreadable gets a row that
  says so, rather than disappearing. A folder holding none of a report's files (summary.json,
  notebook.ipynb, report.html), e.g. the checkpoints a notebook run by plain papermill leaves in
  reports/<experiment>/adhoc, is not a report: it is named in a line under the table, not a red row.
- A run is listed from its first second (the runner rebuilds the index when a run starts and ends).
- Headline metrics are shown as people read them: a short label and a unit (METRICS; the key itself
  in the tooltip), integers as integers. MLflow links are built when the page is written, from
  omni.track.ui_url(), so `MLFLOW_UI_URL=http://host:port omni index` points them all elsewhere.
- A run whose process died (kill -9, a lost machine) leaves status RUNNING behind. `mark_dead_runs`
  finds those whose pid no longer runs on this host, marks them KILLED in summary.json and in
  MLflow, and records the last step MLflow received; `omni run` and `omni index` call it.
"""

from __future__ import annotations

import html
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

from omni import track
from omni.common import atomic_write

UNREADABLE = "UNREADABLE"
REPORT_FILES = ("summary.json", "notebook.ipynb", "report.html")  # a folder holding one of these is a report

WER, CER, ACC = "errors/word (>1: extra words)", "errors/char", "accuracy 0..1"


def units_table(text: str) -> dict[str, tuple[str, str]]:
    """`key | label | unit` lines (# lines: headings) -> {key: (label, unit)}; WER, CER and ACC name the units above."""
    named = {"WER": WER, "CER": CER, "ACC": ACC}
    rows = [[c.strip() for c in line.split("|")] for line in text.strip().splitlines() if line.strip() and not line.startswith("#")]
    return {key: (label, named.get(unit, unit)) for key, label, unit in rows}


# headline metric -> (short label, unit), as reports/index.html shows it; a table rather than a dict, so
# it reads as one. A key may add a prefix to a listed one: clear_ (clear speech), hard_ (the hard test
# set), before_ / after_ (training). Every `headline:` key of experiments/*.yaml has one (tests/test_runner.py checks).
METRICS = units_table("""
# 01 smoke
final_loss | final training loss | nats/token
loss_drop | training loss drop | nats/token
control_gap | control's final loss minus ours | nats/token
control_gap_bits_per_caption | what the audio tells beyond the control | bits/caption
caption_accuracy | captions decoded from the audio | fraction
control_caption_accuracy | captions decoded by the control | fraction
passed | verdict | 1 pass, 0 fail
# 02 LM pretraining
val_bpb | validation loss | bits/byte
first_nats | validation passages read once | nats/token
copy_nats | the same passages read again (copying) | nats/token
train_tokens | training tokens | tokens
random_copy | repeated random tokens predicted | fraction
noisy_copy_nats | passages read again after a copy with 20 % of tokens misspelt | nats/token
# 03 alignment (held-out clips: unseen sentences and voices)
wer | held-out WER | WER
median_wer | held-out median WER per clip | WER
cer | held-out CER | CER
whisper_wer | Whisper's own decoder, WER | WER
whisper_unguarded_wer | Whisper's own decoder without the loop guard, WER | WER
control_wer | shuffled-audio control, WER | WER
guard_floor | loop guard's log-prob floor | nats/token
unguarded_wer | ours, greedy without the loop guard, WER | WER
greedy_wer | ours, greedy (the LM alone), WER | WER
greedy_control_wer | ours, greedy, shuffled audio, WER | WER
joint_wer | ours, joint CTC/LM beam search, WER | WER
joint_control_wer | ours, joint, shuffled audio, WER | WER
joint_cer | ours, joint CTC/LM beam search, CER | CER
whisper_cer | Whisper's own decoder, CER | CER
ctc_cer | audio tokens read alone (CTC readout), CER | CER
ctc_wer | audio tokens read alone (CTC readout), WER | WER
wer_seen_voice | WER on new sentences in training voices | WER
test_loss | held-out loss | nats/token
fallback_fraction | clips the loop guard re-decoded | fraction
train_seconds | training time | s
ctc_decode_weight_chosen | joint decoding's CTC weight, chosen on val | weight
# 04/05 layer and projector ablations
content.wer | content: held-out WER | WER
content.test_loss | content: held-out loss | nats/token
content.audio_tokens_per_s | audio tokens per second of speech | tokens/s
content.tokens_per_s | training throughput | tokens/s
time.total | wall time of this point | s
grid.wall_seconds | wall time of the grid | s
# 06 embedding map
retrieval_a2t | clip's audio finds its transcript, top-1 | fraction
cos_clip | cosine, clip's audio tokens vs its transcript's embeddings | cosine -1..1
cka_word | linear CKA, audio tokens vs their words' embeddings | 0..1
word_hit_at_5 | audio tokens whose word is among their 5 nearest LM tokens | fraction
# 07 instruction tuning on texture (mean over tasks)
texture_mean | texture accuracy | ACC
texture_chance_mean | chance | ACC
texture_balanced_mean | balanced texture accuracy | ACC
texture_valid_mean | answers that are a valid option | fraction
texture_floor_mean | floor: max(chance, train majority) | ACC
texture_over_floor | texture accuracy above the floor | ACC
texture_open_mean | balanced accuracy, questions answered in words (5 tasks) | ACC
texture_mc_mean | balanced accuracy, lettered questions (5 tasks) | ACC
train_majority_texture_mean | train-majority baseline | ACC
hard_texture_floor_mean | hard set: floor | ACC
transcript_only_texture_mean | transcript-only baseline | ACC
shuffled_texture_mean | shuffled-audio baseline | ACC
probe_texture_mean | linear-probe baseline | ACC
texture_tasks_above_transcript_only | tasks above the transcript-only baseline | tasks
meets_bar | meets the bar (per task and mean above the baselines) | 1 yes, 0 no
transcribe_wer | transcription through chat, WER | WER
transcribe_clear_wer | transcription through chat, clear speech, WER | WER
val_loss | validation loss | nats/token
# 08 hearing (the trainable axis)
clear_joint_median_wer | ours, joint, median WER per clip | WER
""")
PREFIXES = {"clear_": "clear speech", "hard_": "hard set", "before_": "before training", "after_": "after training"}
PROBE = re.compile(r"probe\.(\w+)\.(\w+)\.(\w+)")  # probe.<attribute>.<linear|attention>.<split>
LADDER = re.compile(r"ladder\.(whisper|audio_tokens|lm_state|answer)\.(\w+)")  # ladder.<rung>.<task>
LADDER_RUNGS = {"whisper": "Whisper-state probe", "audio_tokens": "audio-token probe", "lm_state": "LM-state probe", "answer": "answer"}
SPLITS = {"test": "unseen voices", "test_seen_voice": "training voices, new sentences"}


def metric_label(key: str) -> tuple[str, str] | None:
    """(short label, unit) of a headline metric, or None when METRICS does not know it."""
    if key in METRICS:
        return METRICS[key]
    if m := PROBE.fullmatch(key):
        return f"{m[1]} from a {m[2]} probe, {SPLITS.get(m[3], m[3])}", ACC
    if m := LADDER.fullmatch(key):
        return f"{m[2]} at the ladder's {LADDER_RUNGS.get(m[1], m[1])}, held-out voices", "balanced accuracy"
    for prefix, where in PREFIXES.items():
        if key.startswith(prefix) and (base := metric_label(key[len(prefix):])):
            return f"{base[0]}, {where}", base[1]
    return None


def read_summary(folder: Path) -> dict[str, Any]:
    """A report folder's summary.json, or {} when it is missing; ValueError when unreadable."""
    f = Path(folder) / "summary.json"
    if not f.exists():
        return {}
    try:
        s = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: unreadable ({e})") from e
    if not isinstance(s, dict):
        raise ValueError(f"{f}: not a JSON object")
    return s


def report_folders(reports: Path) -> list[Path]:
    """reports/<experiment>/<stamp> and a grid's reports/<experiment>/<stamp>/<point>: every folder
    holding a report's files (REPORT_FILES), plus the empty ones a run has just made."""
    out = []
    for d in sorted(p for p in reports.glob("*/*") if p.is_dir()):
        if is_report(d) or not any(d.iterdir()):
            out.append(d)
        out += sorted(c for c in d.iterdir() if c.is_dir() and ((c / "summary.json").exists() or (c / "notebook.ipynb").exists()))
    return out


def is_report(folder: Path) -> bool:
    return any((folder / f).exists() for f in REPORT_FILES)


def not_reports(reports: Path) -> list[Path]:
    """Folders at a report's place that hold none of a report's files (e.g. reports/smoke/adhoc: the
    checkpoints of a notebook run by plain papermill)."""
    return sorted(d for d in reports.glob("*/*") if d.is_dir() and any(d.iterdir()) and not is_report(d))


def report_dir_of(run_id: str, reports: Path) -> Path:
    """The report folder of an MLflow run id (its summary.json names it)."""
    for d in report_folders(Path(reports)):
        try:
            if read_summary(d).get("run_id") == run_id:
                return d
        except ValueError:
            continue
    raise ValueError(f"run {run_id!r}: no report folder under {reports} names this MLflow run id (or it is not a folder)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead_runs(reports: str | Path) -> list[Path]:
    """Mark RUNNING reports whose process is gone (same host) as KILLED, here and in MLflow."""
    marked = []
    host = socket.gethostname()
    for d in report_folders(Path(reports)):
        try:
            s = read_summary(d)
        except ValueError:
            continue
        if s.get("status") != "RUNNING" or s.get("host") != host or not isinstance(s.get("pid"), int) or _alive(s["pid"]):
            continue
        last_step = None
        if s.get("run_id"):
            try:
                last_step = track.last_step(s["run_id"])
                track.end_run(s["run_id"], "KILLED")
            except Exception:  # the store may not hold the run (another tracking URI): the folder still gets marked
                pass
        s |= {"status": "KILLED", "error": "the process running this report died (killed or lost); resume with `omni run --resume`"
              + (f"; last logged step {last_step}" if last_step is not None else ""), "last_step": last_step}
        atomic_write(d / "summary.json", json.dumps(s, indent=2, default=str))
        marked.append(d)
    return marked


def _fmt(v: Any) -> str:
    """A number for people: integers as integers (thousands separated), others to 4 significant digits."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def _headline(key: str, value: Any) -> str:
    label, unit = metric_label(key) or (key, "")
    return (f'<span class="m" title="{html.escape(key)}">{html.escape(label)}</span> <b>{_fmt(value)}</b>'
            + (f' <span class="u">{html.escape(unit)}</span>' if unit else ""))


def _ids(s: dict) -> tuple[str, str]:
    """(experiment id, run id) of a summary; older summaries only kept the run's URL."""
    exp, run = str(s.get("experiment_id") or ""), str(s.get("run_id") or "")
    if not exp and (m := re.search(r"#/experiments/([^/]+)/runs/([^/?]+)", str(s.get("mlflow_url", "")))):
        exp, run = m[1], run or m[2]
    return exp, run


def write_index(reports: str | Path) -> Path:
    """reports/index.html: every report folder with its status and headline metrics, newest first."""
    reports = Path(reports)
    rows = []
    for d in report_folders(reports):
        rel = d.relative_to(reports).as_posix()
        try:
            s = read_summary(d)
        except ValueError as e:
            s = {"status": UNREADABLE, "error": str(e)}
        if not s:
            s = {"status": UNREADABLE, "error": "no summary.json (the run died before writing one, or this is not a report)"}
        s.setdefault("experiment", rel.split("/")[0])
        s.setdefault("run_name", rel)
        s.setdefault("started", rel.split("/")[1] if "/" in rel else "")
        s["_dir"] = rel
        rows.append(s)
    rows.sort(key=lambda s: (str(s.get("started", "")), bool(s.get("grid_parent")), str(s.get("run_name", ""))), reverse=True)
    ui = track.ui_url()
    body = []
    for s in rows:
        name = html.escape(str(s["run_name"]))
        link = f'<a href="{html.escape(s["_dir"])}/{s["html"]}">{name}</a>' if s.get("html") else name
        exp_id, run_id = _ids(s)
        run = f'<a href="{html.escape(track.run_url(run_id, exp_id, ui))}">run</a>' if exp_id and run_id else ""
        experiment = html.escape(str(s.get("experiment", "")))
        if exp_id:
            experiment = f'<a href="{html.escape(track.experiment_url(exp_id, ui))}">{experiment}</a>'
        metrics = "<br>".join(_headline(k, v) for k, v in (s.get("headline") or {}).items())
        params = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}" for k, v in (s.get("params") or {}).items())
        cls = "ok" if s.get("status") == "FINISHED" else "run" if s.get("status") == "RUNNING" else "fail"
        err = f'<div class="err">{html.escape(str(s.get("error", "")))}</div>' if s.get("error") else ""
        kind = "grid" if s.get("grid_parent") else ("child" if s.get("parent_run_id") else "")
        body.append(
            f'<tr class="{kind}"><td>{experiment}</td><td>{link}</td><td>{run}</td>'
            f'<td class="{cls}">{html.escape(str(s.get("status", "")))}{err}</td><td class="h">{metrics}</td>'
            f'<td class="p">{params}</td><td>{html.escape(str(s.get("finished", "")))}</td></tr>'
        )
    loose = sorted(p.name for p in reports.glob("*.html") if p.name != "index.html")  # e.g. the corpus datasheet
    others = "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>' for n in loose)
    others = f"<h2>Other reports</h2><ul>{others}</ul>" if others else ""
    stray = [d.relative_to(reports).as_posix() for d in not_reports(reports)]
    if stray:
        others += ('<p class="p">Not reports (no summary.json, notebook or report inside; e.g. what a notebook run by plain '
                   "papermill leaves in <code>adhoc</code>): " + ", ".join(f"<code>{html.escape(d)}</code>" for d in stray) + "</p>")
    command = track.ui_command()
    served = (f"(links open while <code>{html.escape(command)}</code> runs; elsewhere: set <code>MLFLOW_UI_URL</code> "
              "and run <code>omni index</code>)") if command else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>omni reports</title><style>
body{{font-family:system-ui,sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}}
.ok{{color:#197a2b}} .run{{color:#8a6d00}} .fail{{color:#b00020;font-weight:bold}} .err{{font-weight:normal;font-size:85%}}
.p{{font-size:80%;color:#555;max-width:30em}} tr.child td:nth-child(2){{padding-left:2em}} tr.grid{{background:#f4f6fa}}
.h{{font-size:90%;white-space:nowrap}} .u{{color:#777;font-size:85%}}
</style></head><body><h1>omni reports</h1><p>{len(rows)} reports; MLflow: <code>{html.escape(track.tracking_uri())}</code>,
UI at <a href="{html.escape(ui)}">{html.escape(ui)}</a> {served}</p>
<table><tr><th>experiment</th><th>report</th><th>MLflow</th><th>status</th><th>headline</th><th>parameters</th><th>finished</th></tr>
{''.join(body)}</table>{others}</body></html>"""
    out = reports / "index.html"
    atomic_write(out, page)
    return out
