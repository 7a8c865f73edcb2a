"""Notebooks end their runs cleanly. Each runs under papermill's own CLI (`-p NAME VALUE`, no omni
runner) on tiny settings: every cell runs, and the MLflow run it logs into ends FINISHED. Without
`tracker.finish()` as its last line, a notebook's own run would be ended FAILED at exit
(Tracker._at_exit: the process ended before the notebook did), however well it went.

Where each runs: 01 in test_params, 02, 03 and 07 here, 04 and 05 in test_layer_ablation (05 on the grid
that test runs through `omni run`), 06 in test_embedding_map. Every experiment file loads and checks."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from conftest import REPO, only_run, papermill, papermill_env
from omni import params
from omni.run.experiment import checked_params, grid_points, load_experiment, read_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_ends_with_finish_and_shows_figures_one_way(nb):
    cells = [c.source for c in jupytext.read(nb).cells if c.cell_type == "code"]
    assert cells[-1].strip().splitlines()[-1].startswith("tracker.finish()"), f"{nb.name}: the last line must be tracker.finish()"
    source = "\n".join(cells)
    assert "IProgress" not in source, f"{nb.name}: ipywidgets is installed; no warning filter needed"
    assert "plt.close(" not in source, f"{nb.name}: log, show and close a figure with plots.show(tracker, fig, name)"


@pytest.mark.parametrize("ending, status", [("tracker.finish()", "FINISHED"), ("raise SystemExit('a cell failed')", "FAILED")])
def test_a_run_a_process_started_ends_finished_or_failed(tmp_path, ending, status):
    """What plain papermill leaves behind: a run the notebook opened itself (no mlflow_run_id) ends
    FINISHED when it reaches tracker.finish(), FAILED when the process ends first."""
    script = ("from dataclasses import dataclass\nfrom omni import track\n"
              "@dataclass\nclass Config:\n    steps: int = 3\n"
              "tracker = track.open_run('owned', '', Config())\ntracker.log_metrics({'loss': 1.0})\n" + ending + "\n")
    env = papermill_env(tmp_path / "mlflow.db")
    subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    run = only_run(tmp_path / "mlflow.db", "owned")
    assert run.info.status == status and run.data.metrics["loss"] == 1.0 and run.data.params["steps"] == "3"


def test_every_experiment_file_loads_and_checks(monkeypatch):
    """Every experiments/*.yaml names a notebook, known parameters and values its config accepts, at every grid point."""
    monkeypatch.chdir(REPO)  # an experiment names its notebook relative to the repository
    files = sorted(Path("experiments").glob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        exp = load_experiment(f)
        found = params.notebook_config(read_notebook(exp.notebook))
        assert found is not None, f"{f.name}: {exp.notebook} names no config class"
        for point in grid_points(exp):
            checked_params(exp, point, found)


def test_an_old_parameter_name_still_works_for_one_release(capsys, monkeypatch):
    """instruct's `audio_path` is now `run`: from a YAML or -p, and injected by papermill, with a note."""
    from omni.experiments.instruct import InstructConfig

    monkeypatch.chdir(REPO)
    exp = load_experiment("experiments/instruct.yaml", {"audio_path": "reports/alignment/x"})
    assert exp.parameters["run"] == "reports/alignment/x" and "audio_path" not in exp.parameters
    assert "`audio_path` is now `run`" in capsys.readouterr().err
    notebook_globals = {f.name: f.default for f in dataclasses.fields(InstructConfig)} | {"audio_path": "reports/alignment/x"}
    assert params.from_params(InstructConfig, notebook_globals).run == "reports/alignment/x"
    with pytest.raises(Exception, match="give one of them"):
        load_experiment("experiments/instruct.yaml", {"audio_path": "a", "run": "b"})


@pytest.fixture
def env(tmp_path):
    return papermill_env(tmp_path / "mlflow.db")


def test_pretrain_notebook(tmp_path, env):
    from omni.experiments.pretrain_lm import PretrainConfig

    res = papermill("02_pretrain_lm.ipynb", tmp_path / "out.ipynb", env, out=tmp_path / "lm", out_dir=tmp_path / "run",
                    sources="sherlock", vocab_size=300, depth=1, sequence_len=32, batch_size=4, steps=4, warmup=1,
                    eval_every=2, eval_tokens=512, device="cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "lm" / "model.safetensors").exists()
    run = only_run(tmp_path / "mlflow.db", "pretrain_lm")
    assert run.info.status == "FINISHED"
    assert {f.name for f in dataclasses.fields(PretrainConfig)} | {"out_dir"} == set(run.data.params)
    assert run.data.params["steps"] == "4" and "val_bpb" in run.data.metrics


def heard_corpus(corpus: Path, out: Path, n: int | None = None) -> Path:
    """The tiny corpus with (the first n of) its training clips copied into the held-out split: a model
    that memorised them can only answer them better than with shuffled audio by listening."""
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    for r in rows:
        r["audio"] = str((corpus / r["audio"]).resolve())
    train = [r for r in rows if r["split"] == "train"]
    out.mkdir(parents=True)
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [dict(r, split="test") for r in train[:n]]))
    shutil.copy(corpus / "config.json", out / "config.json")  # the hard set is rendered from it
    return out


def test_alignment_notebook(tiny_alignment, tmp_path, env):
    """03 with the LM training too: 60 steps memorise the 11 training sentences, 4 of which are held out
    again (heard_corpus), so the verdict, beating the shuffled-audio control, holds by a wide margin and
    the run ends FINISHED."""
    corpus = heard_corpus(tiny_alignment.corpus, tmp_path / "corpus", n=4)
    res = papermill("03_alignment.ipynb", tmp_path / "out.ipynb", env, corpus=corpus, features=tmp_path / "features",
                    lm=tiny_alignment.lm, out_dir=tmp_path / "run", trainable="projector+lm", steps=60, lr=0.01, warmup=0,
                    batch_size=11, eval_every=0, eval_clips=2, max_new_tokens=40, whisper_baseline=False, device="cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "audio_path.json").exists()
    run = only_run(tmp_path / "mlflow.db", "alignment")
    assert run.info.status == "FINISHED"
    assert run.data.params["steps"] == "60" and run.data.params["lm"] == str(tiny_alignment.lm)
    assert run.data.metrics["wer"] < run.data.metrics["control_wer"]
    html = (tmp_path / "out.ipynb").read_text()
    assert "Held-out results" in html and "WER by style and variant" in html
    # a report for people: no raw nan or 6-decimal counts in its tables, no promise of a skipped baseline
    nb = jupytext.read(tmp_path / "out.ipynb")
    tables = "".join(o.get("data", {}).get("text/html", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert tables.count("<table") >= 3 and ">nan<" not in tables and not re.search(r"\d\.000000", tables)
    committed = json.loads((REPO / "models" / "hear" / "provenance.json").read_text())["trainable_axis"]
    assert committed and all(row["system"] in tables for row in committed)  # the trainable axis, shown
    assert "Whisper's own decoder was skipped in this run" in html and "ours vs Whisper" not in html
    assert "above 1" in html and "If it rises while the training loss falls" in html  # WER > 1 and a rising curve explained
    assert re.search(r"held-out WER \(greedy, 2 clips\)(: [\d.]+ at step 60 \(one evaluation\)| (rose|fell) from| stayed at)", html)  # the curve in words


def test_instruct_notebook(tiny_alignment, tmp_path, env):
    """07 on the tiny corpus: the hard corpus (4 clips), its questions and features are built, the LM
    trains on three texture tasks about clips it is then asked about again (heard_corpus), and both test
    sets are benchmarked with the three baselines. Memorised, the right audio beats shuffled audio
    (texture 0.66 vs 0.49 here), so the verdict holds and the run ends FINISHED."""
    from conftest import tiny_lm
    from omni.data.instructions import InstructionConfig, write_instructions
    from omni.experiments.instruct import InstructConfig

    corpus = heard_corpus(tiny_alignment.corpus, tmp_path / "corpus")
    write_instructions(InstructionConfig(corpus=str(corpus), out=str(tmp_path / "instr"), tasks=("gender", "accent", "style"), chains=0))
    lm = tiny_lm(tmp_path / "lm", sequence_len=512)
    res = papermill("07_instruct.ipynb", tmp_path / "out.ipynb", env, corpus=corpus, features=tmp_path / "features", lm=lm,
                    instructions=tmp_path / "instr", hard_corpus=tmp_path / "hard", hard_features=tmp_path / "features",
                    hard_clips=4, bench_per_task=0, out_dir=tmp_path / "run", trainable="projector+lm", steps=200, lr=0.01,
                    batch_size=8, warmup=0, device="cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "instr" / "test_hard.jsonl").is_file() and (tmp_path / "run" / "model" / "lm" / "model.safetensors").is_file()
    for name in ("test", "test_hard"):
        assert (tmp_path / "run" / f"bench_{name}" / "bench.png").stat().st_size > 1000
    run = only_run(tmp_path / "mlflow.db", "instruct")
    assert run.info.status == "FINISHED"
    assert {f.name for f in dataclasses.fields(InstructConfig)} | {"out_dir"} == set(run.data.params)
    assert {"texture_mean", "texture_chance_mean", "transcript_only_texture_mean", "hard_texture_mean",
            "hard_transcribe_wer", "meets_bar", "loss", "texture_open_mean", "texture_mc_mean"} <= set(run.data.metrics)
    assert run.data.metrics["texture_mean"] > run.data.metrics["shuffled_texture_mean"]
    html = (tmp_path / "out.ipynb").read_text()
    assert "hears" in html and "transcription through chat" in html and "top_answer_share" in html and "the largest fall" in html
    formats = json.loads((tmp_path / "run" / "bench_test" / "scores.json").read_text())["formats"]
    assert {(r["task"], r["format"]) for r in formats} == {(t, f) for t in ("gender", "accent", "style") for f in ("open", "mc")}


def test_tables_and_curves_read_for_people():
    """plots.table: counts whole, numbers to 3 decimals, a missing value as – with a footnote; plots.trend
    says where a curve went."""
    import numpy as np
    import pandas as pd

    from omni.experiments import plots

    df = pd.DataFrame([("ours", "all", 202.0, 1.2345, 0.5), ("control", "all", 202.0, 1.4, np.nan)],
                      columns=["system", "group", "n", "WER", "CER"]).set_index(["system", "group", "n"])
    html = plots.table(df, missing="the control has no CER here").to_html()
    assert ">202<" in html and "202.0" not in html and ">1.234<" in html and ">nan<" not in html
    assert f">{plots.MISSING}<" in html and f"{plots.MISSING} : the control has no CER here</caption>" in html
    assert "<caption" not in plots.table(df.fillna(0.0)).to_html()  # nothing missing, no footnote
    assert plots.trend([(250, 1.43), (500, 1.40), (1000, 1.65)], "held-out WER") == \
        "held-out WER rose from 1.430 (step 250) to 1.650 (step 1000); lowest 1.400 at step 500."
    assert plots.trend([(5, 1.0), (20, 1.0)], "WER") == "WER stayed at 1.000 from step 5 to step 20."
