# `make repro`: set up .venv (once) and run the gated pipeline with DVC.
# `make test`:  the same set-up, then the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
export MPLBACKEND := Agg

.PHONY: setup repro test bench clean

setup: $(STAMP)

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# auto-LiRPA 0.3 pins torch<1.13; pipeline/lirpa_compat.py bridges it to torch 2.x, so skip its deps.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps auto-LiRPA==0.3
	touch $(STAMP)

.dvc/config:
	$(BIN)/dvc init --quiet
	$(BIN)/dvc config core.analytics false

repro: setup .dvc/config
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf data/prepared models metrics plots artifacts reports/build mlflow.db mlruns
