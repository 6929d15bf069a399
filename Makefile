# fisher-monitor developer commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# What installs and runs on the project's 2-core CPU machines (torchvision must match torch
# for pytorch-lightning's torchmetrics import). Users install with plain `pip install .`;
# override here with `make test TORCH_PINS=` to keep an existing torch.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: help venv test test-fast lint format bench demo tensorboard report wheel docs clean

help:
	@echo "make demo   - create .venv, train on digits with FisherMonitor, write TensorBoard logs and a report"
	@echo "make test   - create .venv and run the test suite"
	@echo "make test-fast - the suite without the tests marked slow (for the edit loop)"
	@echo "make lint   - ruff check and format check"
	@echo "make bench  - measurement cost against a plain training step (prints and saves a table)"
	@echo "make tensorboard - open the demo's runs in TensorBoard (LOGDIR=runs)"
	@echo "make report - rebuild the HTML report of the latest demo run (RUN=..., REPORT_DIR=...)"
	@echo "make wheel  - build the wheel into dist/ (python -m build)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(strip $(TORCH_PINS)),$(PY) -m pip install --quiet $(TORCH_PINS))
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# the edit loop: everything but the tests marked `slow` (CI runs `make test`)
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check fisher_monitor tests examples benchmarks
	$(PY) -m ruff format --check fisher_monitor tests examples benchmarks

format: $(VENV)/.installed
	$(PY) -m ruff check --fix fisher_monitor tests examples benchmarks
	$(PY) -m ruff format fisher_monitor tests examples benchmarks

# `make bench BENCH_ARGS=--quick` (about a minute), or e.g. BENCH_ARGS="--cases mlp,report/*"
BENCH_ARGS ?=
bench: $(VENV)/.installed
	$(PY) benchmarks/run.py $(BENCH_ARGS)

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py --demo

# What `make demo` prints, without activating .venv: the dashboard of every run under
# LOGDIR, and the report of RUN (default: the latest demo run) into REPORT_DIR.
LOGDIR ?= runs
RUN ?= $(shell ls -d runs/quickstart/version_* 2>/dev/null | sort -t_ -k2 -n | tail -n 1)
REPORT_DIR ?= $(if $(RUN),$(RUN)/report,reports/quickstart)
tensorboard: $(VENV)/.installed
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

report: $(VENV)/.installed
	@test -n "$(RUN)" || { echo "make report: no demo run under runs/quickstart; run 'make demo' first, or pass RUN=DIR"; exit 2; }
	$(VENV)/bin/fisher-monitor report $(RUN) -o $(REPORT_DIR)

wheel: $(VENV)/.installed
	$(PY) -m build --wheel --outdir dist

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs reports benchmarks/results examples/output site dist build
