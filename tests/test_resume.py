"""Runs that survive, through `omni run` with real kernels on a tiny training notebook:
kill -9 of the runner mid-training leaves a RUNNING report that the next `omni index` marks KILLED
with its last step, `omni run --resume` finishes it in place, bit-identical to an uninterrupted run;
several runs started at once on a fresh database and reports folder all land."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import notebook_project
from omni import track
from omni.cli import main

NOTEBOOK = '''# %% tags=["parameters"]
steps = 8
kill_file = ""
mlflow_run_id = ""
out_dir = ""

# %%
import os, signal
import torch
from safetensors.torch import save_file
from omni import track
from omni.train import TrainConfig, train

t = track.attach(mlflow_run_id)
torch.manual_seed(0)
w = torch.nn.Parameter(torch.randn(4, 4))
data = torch.randn(steps, 4)

def loss_fn(step):
    if kill_file and step == 5 and os.path.exists(kill_file):
        os.unlink(kill_file)
        t.flush()
        os.kill(os.getppid(), signal.SIGKILL)  # the runner dies, as under kill -9 ...
        os.kill(os.getpid(), signal.SIGKILL)  # ... and its kernel with it
    return ((data[step] @ w) ** 2).mean(), 4

train({"w": w}, loss_fn, TrainConfig(steps=steps, lr=0.1, ckpt_every=2, ckpt_dir=f"{out_dir}/ckpt", progress=False), t)
save_file({"w": w.detach()}, f"{out_dir}/final.safetensors")
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    return notebook_project(tmp_path, monkeypatch, NOTEBOOK, "name: tiny\nnotebook: notebooks/train.py\nheadline: [loss]\n")


def omni_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni.cli", "run", *args], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_killed_run_is_marked_then_resumed_bit_identical(project):
    Path("kill-me").touch()
    killed = omni_run("exp.yaml", "-p", "kill_file", "kill-me")
    assert killed.returncode == -9, killed.stderr[-2000:]
    (folder,) = [p for p in Path("reports/tiny").iterdir() if p.is_dir()]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "RUNNING"  # what kill -9 leaves behind
    assert (folder / "ckpt" / "train_state.json").exists() and not (folder / "final.safetensors").exists()

    assert main(["index"]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "KILLED" and summary["last_step"] == 4  # steps 0..4 were logged and flushed; step 5 died in its loss
    assert track.client().get_run(summary["run_id"]).info.status == "KILLED"
    assert "KILLED" in Path("reports/index.html").read_text()

    run_id = summary["run_id"]
    resumed = omni_run("--resume", str(folder))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["run_id"] == run_id  # the same run, continued
    run = track.client().get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    steps = {s for s, _ in track.metric_history(summary["run_id"], "loss")}
    assert steps == set(range(8))  # one run, one history: the steps before the kill and after the resume

    straight = omni_run("exp.yaml")
    assert straight.returncode == 0, straight.stderr[-2000:]
    (other,) = [p for p in Path("reports/tiny").iterdir() if p.is_dir() and p != folder]
    a, b = load_file(folder / "final.safetensors")["w"], load_file(other / "final.safetensors")["w"]
    assert a.equal(b)  # bit-identical on CPU


def test_resume_by_run_id_and_unknown_run(project, capsys):
    assert main(["run", "--resume", "0123456789abcdef"]) == 2
    assert "0123456789abcdef" in capsys.readouterr().err


@pytest.mark.slow  # three runs at once on a new MLflow store: ~60 s on 2 busy cores
def test_parallel_first_runs_on_a_fresh_store_all_land(project):
    procs = [subprocess.Popen([sys.executable, "-m", "omni.cli", "run", "exp.yaml", "-p", "steps", str(2 + i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
             for i in range(3)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-1500:] for o in outs]
    folders = [p for p in Path("reports/tiny").iterdir() if p.is_dir()]
    assert len(folders) == 3  # started in the same second, they still got a folder each
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
    assert sorted(s["params"]["steps"] for s in summaries) == [2, 3, 4]
    assert all(s["status"] == "FINISHED" for s in summaries)
    index = Path("reports/index.html").read_text()
    assert all(s["run_name"] in index for s in summaries)
    runs = track.client().search_runs([track.experiment_id("tiny")])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow  # a grid killed and resumed through papermill: ~50 s on 2 cores; test_killed_run_is_marked_then_resumed_bit_identical runs every time
def test_resumed_grid_reruns_only_unfinished_points(project):
    Path("kill-me").touch()
    killed = omni_run("exp.yaml", "-p", "kill_file", "kill-me", "-p", "steps=[4,8]")  # steps=4 ends before the kill at step 5
    assert killed.returncode == -9, killed.stderr[-2000:]
    (grid,) = [p for p in Path("reports/tiny").iterdir() if p.is_dir()]
    done, cut = grid / "steps=4", grid / "steps=8"
    assert json.loads((done / "summary.json").read_text())["status"] == "FINISHED"
    finished_at = json.loads((done / "summary.json").read_text())["finished"]
    resumed = omni_run("--resume", str(grid))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert resumed.stdout.count("FINISHED") == 1  # only the cut point ran again
    assert json.loads((done / "summary.json").read_text())["finished"] == finished_at
    assert json.loads((cut / "summary.json").read_text())["status"] == "FINISHED" and (cut / "final.safetensors").exists()
    parent = json.loads((grid / "summary.json").read_text())
    assert parent["status"] == "FINISHED" and track.client().get_run(parent["run_id"]).info.status == "FINISHED"


def test_a_second_resume_of_a_running_run_is_refused_naming_the_first(project, capsys):
    import socket

    folder = Path("reports/tiny/20261206-101500")
    folder.mkdir(parents=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        summary = {"experiment": "tiny", "notebook": "notebooks/train.py", "status": "RUNNING", "pid": alive.pid,
                   "host": socket.gethostname(), "started": "20261206-101500", "params": {}}
        (folder / "summary.json").write_text(json.dumps(summary))
        # the run itself still going: refused, the folder untouched
        assert main(["run", "--resume", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (a fresh store logs its migrations first)
        assert err.startswith("omni: error: ") and f"still running (pid {alive.pid} on {socket.gethostname()}" in err
        assert json.loads((folder / "summary.json").read_text())["status"] == "RUNNING"
        # another resume holding the folder (a process of its own): refused, naming it
        holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
f = open({str(folder / '.resume.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()
print('held', flush=True); time.sleep(60)"""], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            assert main(["run", "--resume", str(folder)]) == 2
            assert f"another `omni run --resume` is resuming it (pid {holder.pid}" in capsys.readouterr().err
        finally:
            holder.kill()
            holder.wait()
    finally:
        alive.kill()
        alive.wait()
    # both gone: the run is marked KILLED and the lock left by the killed holder is no obstacle
    assert main(["index"]) == 0
    assert json.loads((folder / "summary.json").read_text())["status"] == "KILLED"
