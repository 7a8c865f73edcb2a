"""What only a browser shows, in Debian's headless Chromium (Playwright; skipped only where no Chromium
is installed): a report of `omni run` opens offline with no progress output in it, and the MLflow UI,
reached by the index's links, shows the run's commit and opens an experiment on its runs table.

One module fixture runs one tiny experiment through `omni run` (a notebook that synthesizes a small
corpus: its progress bar is what used to fill a report) and starts one `mlflow ui` on a free port."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import pytest

from conftest import CHROMIUM, CHROMIUM_ARGS, NO_CHROMIUM, REPO

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)

NOTEBOOK = '''# %% tags=["parameters"]
mlflow_run_id = ""
out_dir = ""

# %%
from omni import track
from omni.data.synth import SynthConfig, build_corpus

t = track.attach(mlflow_run_id)
build_corpus(SynthConfig(out=f"{out_dir}/corpus", sentences=8, min_words=3, max_words=5, test_fraction=0.25, workers=1))
t.log_metrics({"train_tokens": 1563000.0})
t.flush()
print("corpus built")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """SimpleNamespace(project, report, index, commit, ui): one `omni run` report, and `mlflow ui` serving its store."""
    from types import SimpleNamespace

    project = tmp_path_factory.mktemp("browser")
    (project / "notebooks").mkdir()
    (project / "notebooks" / "tiny.py").write_text(NOTEBOOK)
    (project / "tiny.yaml").write_text("name: tiny\nnotebook: notebooks/tiny.py\nheadline: [train_tokens]\n")
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "MLFLOW_UI_URL": ui}
    env.pop("TQDM_DISABLE", None)  # as a user's shell: `omni run` itself turns the bars off
    run = subprocess.run([sys.executable, "-m", "omni.cli", "run", "tiny.yaml"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "without encryption" not in run.stderr
    (report,) = [p.parent / "report.html" for p in (project / "reports" / "tiny").glob("*/summary.json")]
    summary = json.loads((report.parent / "summary.json").read_text())
    # one worker and no job runners (MLflow's GenAI jobs): two cores are shared; its own process group, to stop it whole
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", env["MLFLOW_TRACKING_URI"],
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=project, env=env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{ui}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow ui did not start"
                time.sleep(0.5)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        yield SimpleNamespace(project=project, report=report, index=project / "reports" / "index.html",
                              commit=commit, ui=ui, summary=summary)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_a_report_opens_offline_without_progress_lines(served, browser):
    page = browser.new_page()
    fetched = []  # anything but the file itself: a CDN script, a font, ...
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else
               (fetched.append(route.request.url), route.abort()))
    page.goto(served.report.as_uri())
    text = page.inner_text("body")
    assert "corpus built" in text and "synth: rendered 10 clips" in text
    assert "%|" not in text and "clip/s]" not in text  # tqdm's lines, e.g. "synth ...:  10%|█  | 1/10 [00:01<..., 1.2clip/s]"
    assert page.locator('[data-mime-type="application/vnd.jupyter.stderr"]').count() == 0  # no pink box
    assert fetched == []
    page.close()


def test_the_index_links_to_a_run_page_that_shows_the_commit(served, browser):
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(served.index.as_uri())
    assert "training tokens 1,563,000 tokens" in page.inner_text("body")
    href = page.get_by_role("link", name="run", exact=True).get_attribute("href")
    assert href.startswith(served.ui + "/#/experiments/")  # MLFLOW_UI_URL, not a hard-coded port
    page.goto(href)
    expect(page.get_by_text("About this run")).to_be_visible(timeout=30000)
    about = page.inner_text("body").split("About this run", 1)[1]
    assert "tiny.py" in about and served.commit[:7] in about  # "Source tiny.py <commit>", not "Source —"
    page.close()


def test_the_experiment_link_opens_the_runs_table(served, browser):
    from playwright.sync_api import expect

    page = browser.new_page()
    page.goto(served.index.as_uri())
    page.get_by_role("link", name="tiny", exact=True).click()
    expect(page.get_by_text(served.summary["run_name"])).to_be_visible(timeout=30000)
    text = page.inner_text("body")
    assert "Run Name" in text and "Detect Issues" not in text  # the runs table, not the GenAI traces view
    page.close()
