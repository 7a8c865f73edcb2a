"""The comparison of a grid, rebuilt from MLflow: every number in an ablation report is a child run's metric.

`summarize(parent_run_id)` is the one call of the summary notebook (05): the children of the grid's
parent run (`child_runs`) -> mean and std per grid point over seeds (`comparison`) -> findings
(omni.eval.findings) and the grid's cost.

Design choices:
- Only FINISHED children count; the rest are reported, and make the parent FAILED (omni.report).
- Rows are in the grid's order; a layer grid in the encoder's order (states, middle, last, mixes). A grid
  of several axes (e.g. the projector ablation's listed points k / projector / encoder_mode) gets one
  row per point, labelled "k=4 projector=stack encoder_mode=var", in the order the points ran.
- "last" and "middle" are aliases of a state index: when the grid already finished that index with
  the same settings, the alias point copies its metrics (`alias_source`, `copy_run_metrics`; tag
  omni.alias_of) instead of recomputing identical numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

from omni import track
from omni.eval.findings import Finding, grid_findings, last_row, weights_of
from omni.eval.layer_probes import ATTRIBUTES, PROBES, choice_index, layer_choices
from omni.model.encoder import LayerSelect

CONTENT = ("content.wer", "content.cer", "content.test_loss", "content.wer_seen_voice", "content.control_wer")
CONTENT_COST = ("content.audio_tokens_per_s", "content.tokens_per_s", "content.step_seconds", "content.train_seconds")
TIMES = ("time.total", "time.probes", "time.content", "time.prepare", "time.probe.linear", "time.probe.attention")


def alias_source(run_id: str, layer: str, n_states: int) -> str | None:
    """For "last" / "middle": a FINISHED sibling run (same parent) that read the same state by its
    index with the same parameters otherwise (seed included), or None. Its results are this
    point's results (the computation is deterministic given the state, the seed and the settings)."""
    if layer not in ("last", "middle") or not run_id:
        return None
    mlc = track.client()
    run = mlc.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent:
        return None
    index = str(choice_index(layer, n_states))
    mine = {k: v for k, v in run.data.params.items() if k != "layer"}
    for _, r in child_runs(parent).iterrows():
        if r.get("params.layer") == index and r["status"] == "FINISHED" and r.run_id != run_id:
            theirs = {k[len("params."):]: v for k, v in r.items() if k.startswith("params.") and k != "params.layer" and isinstance(v, str)}
            if all(theirs.get(k) == v for k, v in mine.items()) and all(mine.get(k) == v for k, v in theirs.items()):
                return r.run_id
    return None


def copy_run_metrics(source: str, tracker, skip: Sequence[str] = ("time.", "data.")) -> dict[str, float]:
    """Every metric of run `source` (but those starting with `skip`: a run's own cost and data
    facts) with its whole history, steps kept, into `tracker`'s run; tags it omni.alias_of."""
    mlc = track.client()
    latest = {k: v for k, v in mlc.get_run(source).data.metrics.items() if not k.startswith(tuple(skip))}
    for key in latest:
        for m in mlc.get_metric_history(source, key):
            tracker.log_metrics({key: m.value}, step=m.step)
    tracker.set_tags({"omni.alias_of": source})
    tracker.flush()
    return latest


def child_runs(parent_run_id: str):
    """One row per child run of `parent_run_id` (mlflow.search_runs: metrics.*, params.*, tags.*)."""
    import mlflow

    mlc = track.client()
    exp = mlc.get_run(parent_run_id).info.experiment_id
    return mlflow.search_runs(experiment_ids=[exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=50000, output_format="pandas")


def grid_axes(parent_run_id: str) -> dict[str, list]:
    """The grid of a parent run, axis -> values in YAML order: the product axes (the runner's JSON param
    `grid`) and every name the listed points set (param `points`)."""
    params = track.client().get_run(parent_run_id).data.params
    axes = json.loads(params.get("grid", "{}"))
    for point in json.loads(params.get("points", "[]")):
        for k, v in point.items():
            if v not in axes.setdefault(k, []):
                axes[k].append(v)
    return axes


def comparison(runs, by: Sequence[str], order: dict[str, list] | None = None):
    """Mean and std over the runs (seeds) of each group of `by` params, every metric.

    Returns a DataFrame indexed by the `by` values (in `order`'s order where given) with, for each
    metric M, columns M (mean) and M.std (sample std; NaN for one run), plus n_runs and run_ids.
    Only FINISHED runs count."""
    import pandas as pd

    runs = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    mcols = [c for c in runs.columns if c.startswith("metrics.")]
    keys = [f"params.{b}" for b in by]
    missing = [k for k in keys if k not in runs.columns]
    if missing:
        raise ValueError(f"runs have no params {missing}")
    g = runs.groupby(keys, sort=False)
    mean = g[mcols].mean().rename(columns=lambda c: c[len("metrics."):])
    std = g[mcols].std().rename(columns=lambda c: c[len("metrics."):] + ".std")
    table = pd.concat([mean, std], axis=1)
    table = table[[c for m in mean.columns for c in (m, m + ".std")]]
    table["n_runs"] = g.size()
    table["run_ids"] = g["run_id"].agg(lambda ids: " ".join(sorted(ids)))
    table.index.names = list(by)
    if order:
        pos = lambda col, v: order[col].index(v) if col in order and v in order[col] else len(order.get(col, []))  # noqa: E731
        idx = list(table.index)
        keyf = (lambda v: (pos(by[0], v), str(v))) if len(by) == 1 else (lambda v: tuple((pos(b, x), str(x)) for b, x in zip(by, v)))
        table = table.loc[sorted(idx, key=keyf)]
    return table


def grid_order(grid: dict[str, list], n_states: int | None) -> dict[str, list]:
    """The grid's values per axis as strings, in YAML order; `layer` in the encoder's order."""
    order = {k: [str(v) for v in vs] for k, vs in grid.items()}
    if "layer" in order and n_states:
        known = layer_choices(n_states)
        order["layer"] = sorted(order["layer"], key=lambda v: known.index(v) if v in known else len(known))
    return order


def weight_history(run_id: str, prefix: str, n_states: int) -> list[tuple[int, list[float]]]:
    """[(step, [w_0..w_S-1])] from a run's metric history of `prefix<i>` (e.g. content.layer_weight.)."""
    per = [dict(track.metric_history(run_id, f"{prefix}{i}")) for i in range(n_states)]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per and all(per) else []
    return [(s, [p[s] for p in per]) for s in steps]



def label_points(runs, axes: Sequence[str]):
    """(runs with a `params.point` column "k=4 projector=stack", {"point": labels in the order the points
    started}) for a grid of several axes, so that each point is one row of the comparison."""
    labels = [" ".join(f"{a}={r[f'params.{a}']}" for a in axes) for _, r in runs.iterrows()]
    runs = runs.assign(**{"params.point": labels})
    return runs, {"point": list(dict.fromkeys(runs.sort_values("start_time")["params.point"]))}


@dataclass
class GridSummary:
    runs: object  # pandas DataFrame: one row per child run (mlflow.search_runs)
    by: list[str]  # the grid axes the table groups by (seed is averaged over)
    n_states: int | None  # encoder states, from the children's data.n_states
    table: object  # pandas DataFrame: `comparison(runs, by)`
    reference: str  # the row content findings compare against
    findings: list[Finding]
    cost: dict[str, float]  # grid.* metrics: wall seconds, run counts, mean time per point
    failed: list[str] = field(default_factory=list)  # run ids of children that did not finish

    @property
    def layer_grid(self) -> bool:
        return self.by == ["layer"]

    @property
    def weighted_rows(self) -> list[str]:
        """The learned-mix layer choices the table holds (a layer grid only)."""
        return [w for w in LayerSelect.WEIGHTED if "layer" in self.by and w in self.table.index]

    def findings_markdown(self) -> str:
        text = "\n".join(f"- {f.text}" for f in self.findings) or "- (no findings: the grid holds neither probes nor content)"
        return f"# Findings: {', '.join(self.by)} grid ({len(self.runs)} runs)\n\n{text}\n"

    def metrics(self) -> dict[str, float]:
        """The parent run's metrics: the findings' numbers (NaN left out) and the cost."""
        out = {k: v for f in self.findings for k, v in f.metrics.items() if v == v}
        return out | self.cost

    def formatted(self, columns: Sequence[str]):
        """DataFrame of "mean ± std" strings (std left out for one seed), one column per metric."""
        import pandas as pd

        def fmt(col: str) -> pd.Series:
            sd = self.table[col + ".std"] if col + ".std" in self.table else pd.Series(float("nan"), index=self.table.index)
            return pd.Series([f"{m:.3f}" + ("" if s != s else f" ± {s:.3f}") for m, s in zip(self.table[col], sd)], index=self.table.index)

        return pd.DataFrame({c: fmt(c) for c in columns if c in self.table.columns})

    def probe_table(self, split: str):
        """Probe accuracies (and chance) scored on `split`: one column per attribute/probe, rows = grid points."""
        cols = [f"probe.{a}.{p}.{split}" for a in ATTRIBUTES for p in (*PROBES, "chance")]
        out = self.formatted(cols)
        return out.rename(columns=lambda c: c[len("probe."):-len(split) - 1])

    def content_columns(self) -> tuple[list[str], list[str]]:
        """(content quality columns present, content cost columns present)."""
        quality = [c for c in CONTENT if c in self.table.columns]
        cost = [c for c in CONTENT_COST if c in self.table.columns]
        return quality, cost

    def weight_histories(self, layer: str) -> dict[str, list[tuple[int, list[float]]]]:
        """Layer weights vs step of the first-seed child of `layer`: content objective, then each texture one."""
        done = self.runs[(self.runs["params.layer"] == layer) & (self.runs["status"] == "FINISHED")].sort_values("params.seed")
        if done.empty or not self.n_states:
            return {}
        run_id = done.iloc[0].run_id
        hist = {"content (alignment)": weight_history(run_id, "content.layer_weight.", self.n_states)}
        hist |= {f"texture: {a}": weight_history(run_id, f"probe.{a}.weight.", self.n_states) for a in ATTRIBUTES}
        return {k: v for k, v in hist.items() if v}

    def final_weights(self, layer: str) -> dict:
        """{objective: (S,) mean final layer weights of `layer` over seeds}: content, then each texture one."""
        finals = {"content": weights_of(self.table, layer, "content.layer_weight.", self.n_states)}
        finals |= {a: weights_of(self.table, layer, f"probe.{a}.weight.", self.n_states) for a in ATTRIBUTES}
        return {k: v for k, v in finals.items() if v is not None}


def summarize(parent_run_id: str, reference: str = "") -> GridSummary:
    """The comparison, findings and cost of the grid under `parent_run_id`. `reference`: the row
    content findings compare against; "" = the last state for a layer grid, else the first grid value."""
    import pandas as pd

    runs = child_runs(parent_run_id)
    grid = grid_axes(parent_run_id)
    by = [k for k in grid if k != "seed"] or ["seed"]
    n_states = int(runs["metrics.data.n_states"].max()) if "metrics.data.n_states" in runs else None
    order = grid_order(grid, n_states)
    if len(by) > 1:  # several axes (a product, or listed points): one row label per point
        runs, order = label_points(runs, by)
        by = ["point"]
    table = comparison(runs, by, order=order)
    first = order[by[0]][0] if order.get(by[0]) else str(table.index[0])
    ref = reference or ((last_row(table, n_states) or "last") if by == ["layer"] else first)
    failed = runs[runs["status"] != "FINISHED"]
    times = {c: float(runs[f"metrics.{c}"].mean()) for c in TIMES if f"metrics.{c}" in runs}
    parent_start = pd.Timestamp(track.client().get_run(parent_run_id).info.start_time, unit="ms", tz="UTC")
    cost = {"grid.wall_seconds": (runs["end_time"].max() - runs["start_time"].min()).total_seconds(),
            "grid.total_seconds": (pd.Timestamp.now(tz="UTC") - parent_start).total_seconds(),
            "grid.n_runs": float(len(runs)), "grid.n_failed": float(len(failed))}
    cost |= {f"grid.mean_{k}": v for k, v in times.items()}
    return GridSummary(runs, by, n_states, table, ref, grid_findings(table, by, n_states, ref), cost, failed["run_id"].tolist())
