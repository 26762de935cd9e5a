# The two commands of the README: `make demo` and `make test`. Each creates the virtual
# environment (.venv) when it is missing or when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all lint clean

# The suite imports `ask` in a few hundred processes and rewrites every test module's asserts: with
# PYTHONDONTWRITEBYTECODE set (some images set it), each of them compiles again. Empty = unset.
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,cpu]'
	touch $@

demo: $(VENV)/.installed  ## train the digits model (once, cached) and attack it: all six attacks on the four victims
	$(BIN)/ask-attack $(ARGS)

test: $(VENV)/.installed  ## the CI test suite (CPU; skips slow and GPU tests)
	$(PYTEST) $(ARGS)

test-all: $(VENV)/.installed  ## also the slow tests (GPU tests still need CUDA)
	$(PYTEST) -m 'not gpu' $(ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check ask tests scripts

clean:
	rm -rf $(VENV) build dist *.egg-info
