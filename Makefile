# Two commands do everything on a fresh machine:
#   make demo   set up, fetch the real teacher and text, build the embedded chain, report
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench-load

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is named here, in the same command as what depends on it, so pip takes the CPU wheel.
	$(PY) -m pip install -q -e ".[dev]" "torch==2.13.0"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) launch/fetch_assets.py
	$(PY) launch/train_chain.py
	$(PY) launch/init_model.py

test: setup
	$(PY) launch/fetch_assets.py
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check cbd_jax launch configs tests benchmarks
