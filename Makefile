# PortraitGen quick start. On a fresh machine with Python 3.11:
#
#     make demo     # .venv + package with extra "workflow", then the whole pipeline with Snakemake
#     make test     # .venv + package with extra "test", then the test suite
#
# Every target is idempotent: the virtualenv is created once, each extra is installed once per
# version of pyproject.toml (stamp files .venv/.installed-<extra>), and Snakemake reruns only what
# is missing or out of date. Override variables on the command line, e.g.
#     make test PYTHON=python3.11
#     make demo CORES=8 SNAKEMAKE_ARGS="--set-resources train:micro_batch=4"
#     make install TORCH=torch==2.13.0 TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
# torch is installed on its own, before the package: the package only asks for torch>=2.4, which
# would let pip pick any (multi-GB, CUDA) build. Pin the build here instead.
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PIP_ARGS ?=
CORES ?= 2
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
VENV_PY := $(BIN)/python
# The Snakemake rules call the bare `portraitgen` command: put the virtualenv first on PATH.
VENV_PATH := $(abspath $(BIN)):$(PATH)

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

.PHONY: help venv install install-test demo test dry-run lint mlflow-ui clean distclean

help:
	@echo "PortraitGen"
	@echo "  make demo        create $(VENV), install the package (extra: workflow), run the pipeline with Snakemake"
	@echo "  make test        create $(VENV), install the package (extra: test), run the test suite"
	@echo "  make venv        create the virtualenv $(VENV) only"
	@echo "  make install     install torch + the package with extra 'workflow' into $(VENV)"
	@echo "  make install-test  install torch + the package with extra 'test' into $(VENV)"
	@echo "  make dry-run     snakemake -n: which jobs would run, and why"
	@echo "  make lint        snakemake --lint"
	@echo "  make mlflow-ui   open the MLflow UI on the runs in mlflow.db"
	@echo "  make clean       remove results/ and .snakemake/ (keeps $(VENV) and mlflow.db)"
	@echo "  make distclean   clean, and remove $(VENV), mlflow.db, mlruns/, mlartifacts/ and build leftovers"
	@echo "Variables: PYTHON=$(PYTHON) CORES=$(CORES) TORCH=$(TORCH)"

# --- environment -----------------------------------------------------------------------------------

venv: $(VENV_PY)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# One stamp per extra; reinstalls when pyproject.toml changes. The package is installed editable,
# so editing portraitgen/ needs no reinstall.
$(VENV)/.installed-%: pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install $(PIP_ARGS) $(TORCH_PIP_ARGS) '$(TORCH)'
	$(VENV_PY) -m pip install $(PIP_ARGS) -e '.[$*]'
	touch $@

install: $(VENV)/.installed-workflow

install-test: $(VENV)/.installed-test

# --- pipeline ----------------------------------------------------------------------------------------

# Run from the repository root: Snakemake finds workflow/Snakefile and its profile
# workflow/profiles/default by itself; --cores on the command line overrides the profile's.
demo: install
	PATH="$(VENV_PATH)" $(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)
	@echo
	@echo "Results:"
	@echo "  PortraitBench report  results/bench/report.html   (base vs trained, per category, with verdicts)"
	@echo "  curated portraits   results/curate/report.html"
	@echo "  inversion report    results/invert/report.html"
	@echo "  summary metrics     results/train/metrics.json"
	@echo "  per-iteration rows  results/train/metrics.jsonl"
	@echo "  per-sample rows     results/train/samples.jsonl"
	@echo "  trained model       results/train/final"
	@echo "  resume state        results/train/checkpoints"
	@echo "  training log        results/logs/train.log"
	@echo "  MLflow store        mlflow.db (artifacts in mlruns/): one parent run, a child run per stage"
	@echo "Open the MLflow UI with:"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db"

dry-run: install
	PATH="$(VENV_PATH)" $(BIN)/snakemake -n --cores $(CORES) $(SNAKEMAKE_ARGS)

lint: install
	PATH="$(VENV_PATH)" $(BIN)/snakemake --lint

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db

# --- tests -------------------------------------------------------------------------------------------

test: install-test
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

# --- cleaning ----------------------------------------------------------------------------------------

# results/ includes results/train/checkpoints (the resume state of an interrupted training run).
clean:
	rm -rf results .snakemake

distclean: clean
	rm -rf $(VENV) mlflow.db mlruns mlartifacts .pytest_cache build dist *.egg-info
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
