# `make repro`: set up .venv (once) and run the gated pipeline with DVC.
# `make test`:  the same set-up, then the test suite.
# `make study`:  the training-method study (studies/dvc.yaml: one DVC stage per method).
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
export MPLBACKEND := Agg

# Debian libraries for the PDF report (WeasyPrint) and poppler-utils for the PDF tests.
SYSTEM_PACKAGES := libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core poppler-utils
# PostgreSQL for `make mlflow-server` and its test (tests/test_release_postgres.py skips without it):
# installed when root (CI), only suggested otherwise.
OPTIONAL_PACKAGES := postgresql

.PHONY: setup system-deps repro study test bench clean mlflow-server ci-gate

setup: system-deps $(STAMP)

# Installs only what is missing; needs root (CI is root), otherwise prints the command.
system-deps:
	@command -v dpkg >/dev/null || { echo "system-deps: not a Debian system; install pango, harfbuzz-subset, a font and poppler-utils yourself"; exit 0; }; \
	missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	optional=$$(for p in $(OPTIONAL_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$optional" ] && [ "$$(id -u)" != 0 ]; then \
	  echo "system-deps: optional, for make mlflow-server and its test: sudo apt-get install $$optional"; \
	elif [ -n "$$optional" ]; then missing="$$missing $$optional"; fi; \
	missing=$$(echo $$missing); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "system-deps: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "system-deps: missing Debian packages, run: sudo apt-get install $$missing"; exit 1; fi; \
	fi

# Re-install only when the project's dependencies change. The first install downloads torch,
# MLflow and friends (5-12 minutes): pip prints each package as it goes, so it is not silent.
$(STAMP): pyproject.toml
	@echo "setup: creating $(VENV) and installing robustgate with its dependencies (first time: 5-12 minutes)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on -e '.[dev]'
	@echo "setup: auto-LiRPA 0.3 without its dependencies (it pins torch<1.13; pipeline/lirpa_compat.py bridges it)"
	$(BIN)/python -m pip install --disable-pip-version-check --no-deps auto-LiRPA==0.3
	touch $(STAMP)
	@echo "setup: done"

.dvc/config:
	$(BIN)/dvc init --quiet
	$(BIN)/dvc config core.analytics false

repro: setup .dvc/config
	$(BIN)/dvc repro

study: setup .dvc/config
	$(BIN)/dvc repro studies/dvc.yaml

test: setup
	$(BIN)/python -m pytest

# A shared tracking server: PostgreSQL backend store in .mlflow-server/pgdata, served artifact
# store in .mlflow-server/artifacts; prints the MLFLOW_TRACKING_URI to export. Ctrl-C stops it.
MLFLOW_PORT ?= 5000
mlflow-server: setup
	$(BIN)/python -m pipeline.mlflow_server --dir .mlflow-server --port $(MLFLOW_PORT)

# What the CI templates under ci/ run: dvc repro, the gate table and the change since the approved
# model as a job summary, dvc push on the release branch only.
ci-gate: setup .dvc/config
	ci/gate.sh

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf data/prepared models metrics plots artifacts reports/build reports/study mlflow.db mlruns
