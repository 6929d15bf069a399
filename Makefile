# fisher-monitor developer commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# What installs and runs on the project's 2-core CPU machines (torchvision must match torch
# for pytorch-lightning's torchmetrics import). Users install with plain `pip install .`;
# override here with `make test TORCH_PINS=` to keep an existing torch.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: help venv test lint format bench demo docs clean

help:
	@echo "make demo   - create .venv, train on digits with FisherMonitor, write TensorBoard logs and a report"
	@echo "make test   - create .venv and run the test suite"
	@echo "make lint   - ruff check and format check"
	@echo "make bench  - measurement cost against a plain training step (prints and saves a table)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(strip $(TORCH_PINS)),$(PY) -m pip install --quiet $(TORCH_PINS))
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

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

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs reports benchmarks/results examples/output site
