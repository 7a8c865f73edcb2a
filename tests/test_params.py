"""omni.params: configs are the one source of a notebook's parameters; values are typed and checked."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import only_run, papermill, papermill_env
from omni import params
from omni.experiments.smoke import SmokeConfig

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_coerce_follows_the_annotation():
    assert params.coerce(SmokeConfig, "lr", 1) == 1.0 and isinstance(params.coerce(SmokeConfig, "lr", 1), float)
    assert params.coerce(SmokeConfig, "layer", 2) == "2"  # `layer: 2` in YAML is the state index "2"
    assert params.coerce(SmokeConfig, "steps", 3.0) == 3
    for name, bad in (("steps", 2.5), ("steps", "ten"), ("steps", True), ("lr", "fast"), ("device", None)):
        with pytest.raises(params.ParamError, match=f"parameter `{name}`"):
            params.coerce(SmokeConfig, name, bad)


def test_ranges_are_checked_by_the_config_itself():
    with pytest.raises(params.ParamError, match=r"parameter `steps` = 0: must be >= 1"):
        SmokeConfig(steps=0)
    with pytest.raises(params.ParamError, match=r"parameter `control` = 'loud': must be one of shuffle, zero, none"):
        params.check(SmokeConfig, {"control": "loud"})
    with pytest.raises(params.ParamError, match=r"unknown parameter 'stepz'"):
        params.check(SmokeConfig, {"stepz": 1})


def test_from_params_takes_every_field_from_a_namespace_and_nothing_else():
    ns = {f.name: f.default for f in dataclasses.fields(SmokeConfig)} | {"steps": 7, "plt": object(), "out_dir": "x"}
    assert params.from_params(SmokeConfig, ns) == SmokeConfig(steps=7)


def test_generated_cell_has_types_defaults_and_help_from_the_dataclass():
    cell = params.parameters_cell(SmokeConfig, "smoke")
    assert "steps: int = 50  # optimiser steps, full batch of all clips each step" in cell
    assert "lr: float = 0.003  # AdamW peak lr for GPT and projector" in cell
    assert 'out_dir: str = "reports/smoke/adhoc"' in cell and 'mlflow_run_id: str = ""' in cell
    assert all(line.count("=") == 1 for line in cell.splitlines()[1:])  # papermill skips lines with a second '='


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_in_sync_clean_and_paired(nb):
    assert not params.sync_notebook(nb, write=False), f"{nb.name}: run `python -m omni.params` (parameters cell out of date)"
    book = nbformat.read(nb, as_version=4)
    outputs = [i for i, c in enumerate(book.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not outputs, f"{nb.name}: cells {outputs} carry outputs; clear them (jupyter nbconvert --clear-output --inplace)"
    import jupytext

    paired = jupytext.read(nb.with_suffix(".py"))
    assert [c.source for c in paired.cells] == [c.source for c in book.cells], f"{nb.name}: run `jupytext --sync {nb}`"


def open_and_save_in_jupyterlab(root: Path, path: str, python: str | None = None) -> None:
    """What JupyterLab does to a notebook it opens and autosaves, touching nothing: its contents manager
    (jupytext's, as installed) reads the pair, the page sets the kernelspec and the language_info the
    kernel reports (`python`: as if that Python version ran the kernel), and the manager saves both
    files, through the pre-save hook `make setup` configures (notebooks/jupyter_server_config.json)."""
    import json

    from jupyter_server.services.contents.filemanager import FileContentsManager
    from jupytext.sync_contentsmanager import build_sync_jupytext_contents_manager_class

    config = json.loads((REPO / "notebooks" / "jupyter_server_config.json").read_text())
    manager = build_sync_jupytext_contents_manager_class(FileContentsManager)(root_dir=str(root), **config["ContentsManager"])
    model = manager.get(path)
    kernel = params.kernel_metadata()
    if python:
        kernel["language_info"]["version"] = python
    model["content"]["metadata"].update(kernel)
    manager.save({"type": "notebook", "content": model["content"]}, path)


@pytest.mark.parametrize("python", [None, "3.99.1"], ids=["this python", "another python"])
def test_opening_a_notebook_in_jupyterlab_changes_nothing(tmp_path, python):
    """The notebooks are committed as JupyterLab saves them, so opening one (and its autosave) leaves
    both files of the pair as they were: `git status` stays clean. With another Python patch release
    the page reports another version; the pre-save hook keeps the committed one."""
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "notebooks").iterdir() if p.suffix in (".ipynb", ".py")}
    for nb in NOTEBOOKS:
        open_and_save_in_jupyterlab(tmp_path, f"notebooks/{nb.name}", python)
    after = {p.name: p.read_bytes() for p in (tmp_path / "notebooks").iterdir() if p.suffix in (".ipynb", ".py")}
    changed = sorted(name for name in before if after[name] != before[name])
    assert not changed, f"JupyterLab would rewrite {changed}: save them as it does (see open_and_save_in_jupyterlab)"


def test_plain_papermill_runs_a_notebook_and_logs_to_mlflow(tmp_path):
    """papermill's own CLI, as its docs show it, with `-p NAME VALUE`: no omni runner, no run id given.
    The smallest smoke run that passes its verdict (depth 2, 40 steps, as tests/test_smoke.py): the run
    the notebook started itself ends FINISHED in MLflow, with every parameter and the commit."""
    db = tmp_path / "mlflow.db"
    env = papermill_env(db)
    help_ = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(REPO / "notebooks/01_smoke.ipynb")],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert "steps: int (default 50)" in help_.stdout and "optimiser steps" in help_.stdout
    out = papermill("01_smoke.ipynb", tmp_path / "out.ipynb", env, steps=40, depth=2, device="cpu", out_dir=tmp_path / "run")
    assert out.returncode == 0, out.stderr[-3000:]
    run = only_run(db, "smoke")
    assert run.info.status == "FINISHED"
    assert {f.name for f in dataclasses.fields(SmokeConfig)} | {"out_dir"} == set(run.data.params)
    assert run.data.params["steps"] == "40" and run.data.params["depth"] == "2"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert run.data.metrics["loss_drop"] >= 0.5 and run.data.metrics["passed"] == 1.0


def test_layer_and_device_are_checked_before_work():
    with pytest.raises(params.ParamError, match=r"parameter `layer` = '7': must be a state index of tiny.en: 0..4"):
        SmokeConfig(layer="7")
    with pytest.raises(params.ParamError, match=r"parameter `layer` = 'top'"):
        SmokeConfig(layer="top")
    assert SmokeConfig(layer="-1").layer == "-1" and SmokeConfig(layer="weighted_ln", encoder="openai/whisper-base")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(params.ParamError, match="CUDA is not available"):
            SmokeConfig(device="cuda")
