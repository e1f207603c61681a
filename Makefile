# Quick start: `make serve` (install + pull the default model + serve it), `make test` (install + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test serve test test-slow bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# torch is pinned: 2.13.0 is a CPU build on local disk; anything else pulls a multi-GB CUDA build.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/kawai serve

test: install-test
	$(BIN)/python -m pytest -q

test-slow: install-test
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/kawai bench
