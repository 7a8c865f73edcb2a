"""The readout and the interactive page of an embedding map (omni.experiments.embedding_viz): HTML, no network.

Design choices:
- The interactive page is one self-contained HTML file (inline JSON, a <canvas>, ~150 lines of JS):
  no CDN, no plotly, viewable offline. Its page and script are package files
  (omni/experiments/assets/embedding_map.html, .js), filled in at run time: the data as JSON, the script inline.
- JSON has no NaN/inf: they become null. "</" in the data is escaped so no transcript can end the
  script element.
"""

from __future__ import annotations

import html
import json
import math
import re
from importlib import resources
from pathlib import Path

import numpy as np

from omni.common import atomic_write
from omni.eval.embedding_stats import Clip
from omni.experiments.embedding_viz import KIND_NAMES, LABELS, RunViz


_READOUT_CSS = """<style>
.ro{font-family:system-ui,sans-serif;font-size:12px} .ro .clip{margin:0 0 18px 0}
.ro .tx{font-size:14px;margin:2px 0} .ro .lb{color:#666;margin-bottom:4px}
.ro .sc{overflow-x:auto;max-width:100%} .ro table{border-collapse:collapse}
.ro td{border:1px solid #eee;padding:1px 4px;white-space:nowrap;font-family:ui-monospace,monospace;text-align:center}
.ro td.h{font-family:system-ui,sans-serif;color:#666;text-align:right;position:sticky;left:0;background:#fff}
.ro td.w{background:#f4f6fa;font-family:system-ui,sans-serif;font-weight:600} .ro td.s{color:#bbb}
.ro td.hit{background:#c9f0c9} .ro td.tr{background:#eef8e6} .ro tr.sep td{border-top:2px solid #999}
</style>"""


def _word_cells(clip: Clip, n: int) -> str:
    cells, j = [], 0
    while j < n:
        w = int(clip.token_word[j]) if j < len(clip.token_word) else -1
        span = 1
        while j + span < n and (int(clip.token_word[j + span]) if j + span < len(clip.token_word) else -1) == w:
            span += 1
        text = html.escape(clip.words[w]) if w >= 0 else "·"
        cells.append(f'<td class="{"w" if w >= 0 else "s"}" colspan="{span}">{text}</td>')
        j += span
    return "".join(cells)


def readout_html(rv: RunViz, clip_indices: list[int], k: int = 3) -> str:
    """Per clip: the transcript, then one column per audio token: its time, the word under it, and
    its k nearest LM tokens after training and before (green: a token of that word; pale green:
    of the transcript). Hover a cell for its cosine."""
    parts = [_READOUT_CSS, '<div class="ro">']
    for ci in clip_indices:
        c = rv.clips[ci]
        n = len(rv.tokens["after"][ci])
        lab = ", ".join(f"{key}={c.labels[key]}" for key in LABELS if key in c.labels)
        parts.append(f'<div class="clip"><div class="tx">“{html.escape(c.text)}”</div>'
                     f'<div class="lb">{html.escape(lab)}; word timing: {c.timing}</div><div class="sc"><table>')
        parts.append('<tr><td class="h">t (s)</td>' + "".join(f"<td>{(j + 0.5) * rv.seconds_per_token:.2f}</td>" for j in range(n)) + "</tr>")
        parts.append('<tr><td class="h">word</td>' + _word_cells(c, n) + "</tr>")
        text_set = set(c.text_ids)
        for stage in ("after", "before"):
            ids, sims = rv.nn[stage][ci]
            for r in range(min(k, ids.shape[1])):
                row = []
                for j in range(n):
                    w = int(c.token_word[j]) if j < len(c.token_word) else -1
                    tok = int(ids[j, r])
                    cls = "hit" if w >= 0 and tok in c.word_ids[w] else ("tr" if tok in text_set else "")
                    row.append(f'<td class="{cls}" title="cos {sims[j, r]:.3f}">{html.escape(rv.strings[tok])}</td>')
                sep = ' class="sep"' if r == 0 else ""
                parts.append(f'<tr{sep}><td class="h">{stage} #{r + 1}</td>' + "".join(row) + "</tr>")
        parts.append("</table></div></div>")
    parts.append("</div>")
    return "".join(parts)


def _finite(x):
    """JSON has no NaN/inf: they become null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _payload(rv: RunViz, digits: int = 4) -> dict:
    audio = rv.map.kind > 0
    nn_ids, nn_sims = [], []
    for kind, c, p in zip(rv.map.kind, rv.map.clip, rv.map.pos):
        if kind == 0:
            nn_ids.append(None)
            nn_sims.append(None)
        else:
            ids, sims = rv.nn[KIND_NAMES[kind]][c]
            nn_ids.append(ids[p].tolist())
            nn_sims.append([round(float(s), 3) for s in sims[p]])
    used = set(rv.map.pos[~audio].tolist()) | {i for row in nn_ids if row for i in row} | {i for c in rv.clips for i in c.text_ids}
    clips = [{"text": c.text, "words": c.words, "timing": c.timing, "tw": c.token_word.tolist(),
              "labels": {k: c.labels[k] for k in LABELS if k in c.labels}, "ids": sorted(set(c.text_ids))} for c in rv.clips]
    return {
        "name": rv.name, "spt": rv.seconds_per_token, "stats": _finite(rv.stats), "timing": _finite(rv.timing_check),
        "kind": rv.map.kind.tolist(), "clip": rv.map.clip.tolist(), "pos": rv.map.pos.tolist(),
        "xy": {k: np.round(v.astype(np.float64), digits).ravel().tolist() for k, v in rv.map.xy.items()},
        "nn": nn_ids, "nns": nn_sims, "clips": clips, "vocab": {str(i): rv.strings[i] for i in sorted(used)},
    }



def _asset(name: str) -> str:
    return resources.files("omni.experiments").joinpath("assets", name).read_text(encoding="utf-8")


def write_interactive(path: str | Path, runs: list[RunViz], title: str = "omni: audio tokens in the LM's embedding space", note: str = "") -> Path:
    """One self-contained HTML file: inline JSON and JS, a canvas; nothing loaded from the network."""
    data = json.dumps({"runs": [_payload(r) for r in runs]}, separators=(",", ":")).replace("</", "<\\/")
    page = _asset("embedding_map.html").replace("__TITLE__", html.escape(title)).replace("__NOTE__", html.escape(note))
    page = page.replace("__SCRIPT__", _asset("embedding_map.js")).replace("__DATA__", data)  # data last: it may hold any text
    return atomic_write(path, page)


_REMOTE = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import|<link\b|<iframe\b""", re.I)


def remote_references(page: str) -> list[str]:
    """What in an HTML page would reach the network (script/link/img sources, CSS imports/urls);
    the inline JSON payload is skipped, since transcripts may mention a URL as text."""
    head, _, rest = page.partition('<script type="application/json" id="data">')
    _, _, tail = rest.partition("</script>")
    return [m.group(0) for m in _REMOTE.finditer(head + tail)]
