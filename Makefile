# `make run` and `make test` create .venv and install what they need on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: run test test-fast lint bench install-run install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Serving needs no torch: `make run` installs the package alone.
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Tests and benchmarks also train (torch==2.13.0, CPU) and lint.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,train]'
	touch $@ $(VENV)/.run-installed

install-run: $(VENV)/.run-installed
install-dev: $(VENV)/.dev-installed

run: install-run
	$(BIN)/mur up $(ARGS)

lint: install-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: install-dev lint
	$(BIN)/pytest

test-fast: install-dev
	$(BIN)/pytest -m "not slow"

bench: install-dev
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.models
	$(BIN)/python -m bench.replay

clean:
	rm -rf $(VENV) .mur .pytest_cache .mypy_cache .ruff_cache
