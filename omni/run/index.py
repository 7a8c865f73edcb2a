"""reports/index.html: every report folder with its status, headline metrics and MLflow run.

Design choices:
- The index is rebuilt from the report folders' summary.json files, never edited in place, and
  written atomically: a reader never sees half a page, and two runs finishing together cannot
  leave an index that lacks one of them (each rebuild reads every folder).
- Every report folder is listed: one whose summary.json is missing or unreadable gets a row that
  says so, rather than disappearing.
- A run whose process died (kill -9, a lost machine) leaves status RUNNING behind. `mark_dead_runs`
  finds those whose pid no longer runs on this host, marks them KILLED in summary.json and in
  MLflow, and records the last step MLflow received; `omni run` and `omni index` call it.
"""

from __future__ import annotations

import html
import json
import os
import socket
from pathlib import Path
from typing import Any

from omni import track
from omni.common import atomic_write

UNREADABLE = "UNREADABLE"


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
    """reports/<experiment>/<stamp> and a grid's reports/<experiment>/<stamp>/<point>."""
    out = []
    for d in sorted(p for p in reports.glob("*/*") if p.is_dir()):
        out.append(d)
        out += sorted(c for c in d.iterdir() if c.is_dir() and ((c / "summary.json").exists() or (c / "notebook.ipynb").exists()))
    return out


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
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


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
    body = []
    for s in rows:
        name = html.escape(str(s["run_name"]))
        link = f'<a href="{html.escape(s["_dir"])}/{s["html"]}">{name}</a>' if s.get("html") else name
        run = f'<a href="{html.escape(s["mlflow_url"])}">run</a>' if s.get("mlflow_url") else ""
        metrics = ", ".join(f"{html.escape(k)}={_fmt(v)}" for k, v in (s.get("headline") or {}).items())
        params = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}" for k, v in (s.get("params") or {}).items())
        cls = "ok" if s.get("status") == "FINISHED" else "run" if s.get("status") == "RUNNING" else "fail"
        err = f'<div class="err">{html.escape(str(s.get("error", "")))}</div>' if s.get("error") else ""
        kind = "grid" if s.get("grid_parent") else ("child" if s.get("parent_run_id") else "")
        body.append(
            f'<tr class="{kind}"><td>{html.escape(str(s.get("experiment", "")))}</td><td>{link}</td><td>{run}</td>'
            f'<td class="{cls}">{html.escape(str(s.get("status", "")))}{err}</td><td>{metrics}</td>'
            f'<td class="p">{params}</td><td>{html.escape(str(s.get("finished", "")))}</td></tr>'
        )
    loose = sorted(p.name for p in reports.glob("*.html") if p.name != "index.html")  # e.g. the corpus datasheet
    others = "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>' for n in loose)
    others = f"<h2>Other reports</h2><ul>{others}</ul>" if others else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>omni reports</title><style>
body{{font-family:system-ui,sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}}
.ok{{color:#197a2b}} .run{{color:#8a6d00}} .fail{{color:#b00020;font-weight:bold}} .err{{font-weight:normal;font-size:85%}}
.p{{font-size:80%;color:#555;max-width:30em}} tr.child td:nth-child(2){{padding-left:2em}} tr.grid{{background:#f4f6fa}}
</style></head><body><h1>omni reports</h1><p>{len(rows)} reports; MLflow: <code>{html.escape(track.tracking_uri())}</code>
(links to runs work while <code>mlflow ui --backend-store-uri {html.escape(track.tracking_uri())}</code> runs)</p>
<table><tr><th>experiment</th><th>report</th><th>MLflow</th><th>status</th><th>headline</th><th>parameters</th><th>finished</th></tr>
{''.join(body)}</table>{others}</body></html>"""
    out = reports / "index.html"
    atomic_write(out, page)
    return out
