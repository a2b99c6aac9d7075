# Two commands do all the set-up on a fresh machine:
#   make train   - create .venv, install, run the digits distillation (CPU, minutes)
#   make test    - create .venv, install, run the test suite
#   make test-fast - the tests that are neither slow nor need Ray (under 2 minutes): the edit loop
#   make lint      - ruff and mypy (.ci/run runs it before the tests)
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= PASSIVE
export WANDB_MODE ?= offline

.PHONY: setup train test test-fast lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first (a local-disk wheel here), so no dependency pulls a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

train: setup
	$(PY) -m nitro_dist.train $(ARGS)

# two pytest-xdist workers: one runs the Ray tests (one block, in order), the other the rest
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow and not ray"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m mypy
