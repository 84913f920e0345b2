# Two commands do everything on a fresh machine:
#   make demo   set up, fetch the real teacher and text, build the embedded chain, report
#   make test   set up, lint, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The venv holds CPU jax plus libtpu (for AOT compiles to TPU topologies); on a machine without a
# TPU, JAX would first try (and fail, noisily) to start libtpu. Override on a TPU VM:
# `make demo JAX_PLATFORMS=`.
export JAX_PLATFORMS ?= cpu

.PHONY: setup demo pipeline test lint

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is named here, in the same command as what depends on it, so pip takes the CPU wheel.
	$(PY) -m pip install -q -e ".[dev]" "torch==2.13.0"
	touch $@

setup: $(VENV)/.installed

# The embedded default (configs/default.py): SmolLM2-135M -> ~70M -> ~30M anchors, then a 50M
# model between the two anchors with no teacher call, then the report. Re-running resumes.
demo: setup
	$(PY) launch/fetch_assets.py
	$(PY) launch/train_chain.py
	$(PY) launch/init_model.py --size=50m --overwrite
	$(PY) launch/report.py

# The rest of the pipeline on the demo's chain, offline: recover the 50M target briefly (plain LM
# loss on the training text, no teacher), then evaluate it and the un-recovered target on the
# local multiple-choice task (lm-eval, the news next-sentence task). Run after `make demo`.
pipeline: setup
	$(PY) launch/train_target.py --config=configs/recovery.py \
	    --config.model=runs/smollm2_chain/targets/50m --config.tokens=16384 \
	    --config.workdir=runs/t50m_recovery --config.out=runs/t50m_recovered
	$(PY) launch/evaluate.py --model=runs/smollm2_chain/targets/50m --tasks=cbd_news_next --limit=100
	$(PY) launch/evaluate.py --model=runs/t50m_recovered --tasks=cbd_news_next --limit=100

# The linter runs first: a lint error fails the test target (and CI) before any test runs.
# -rs lists every skip with its reason; CBD_FAIL_ON_SKIP=1 fails the run on a skip that
# tests/skip_policy.py does not allow (one that depends on what the machine permits, not on what
# `make setup` installs).
test: lint
	$(PY) launch/fetch_assets.py
	CBD_FAIL_ON_SKIP=1 $(PY) -m pytest -q -rs --durations=25 tests

lint: setup
	$(VENV)/bin/ruff check cbd_jax launch configs tests benchmarks
