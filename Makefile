# Quick start: `make serve` (install + pull the default model + serve it), `make test` (install + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test install-ray lock serve test test-slow bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Installs come from the locks in requirements/ (exact versions with hashes), so a fresh machine next month gets
# what passed today; pyproject.toml keeps the compatible ranges for `pip install kawai`. `make lock` refreshes.
$(VENV)/.installed: requirements/runtime.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --require-hashes -r requirements/runtime.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-test: requirements/test.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --require-hashes -r requirements/test.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $@ $(VENV)/.installed

# Ray Serve (the `ray` extra) on top of the test set: `kawai serve --ray` and the Ray tests in the slow suite.
$(VENV)/.installed-ray: requirements/ray.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --require-hashes -r requirements/ray.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $@ $(VENV)/.installed-test $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-ray: $(VENV)/.installed-ray

# uv resolves the locks (runtime; test; test + the ray extra); /opt/wheels holds the CPU build of torch on
# this project's machines.
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml -q --generate-hashes --python-version 3.11 --no-header \
	$(if $(wildcard /opt/wheels),--find-links /opt/wheels)
lock: | $(BIN)/python
	$(BIN)/pip install -q uv
	$(UV_COMPILE) --universal -o requirements/runtime.txt
	$(UV_COMPILE) --extra test --override requirements/overrides.txt \
		--python-platform x86_64-manylinux_2_28 -o requirements/test.txt
	$(UV_COMPILE) --extra test --extra ray --override requirements/overrides.txt \
		--python-platform x86_64-manylinux_2_28 -o requirements/ray.txt

serve: install
	$(BIN)/kawai serve

# -P: the repository root is not put on sys.path, so its folders (kernels/, api/, engine/) never shadow an
# installed package of the same name (Hugging Face's `kernels`, which transformers imports). Our code is `kawai.*`.
test: install-test
	$(BIN)/python -P -m pytest -q

test-slow: install-test
	$(BIN)/python -P -m pytest -q -m slow

bench: install
	$(BIN)/kawai bench
