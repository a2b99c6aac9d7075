# Two commands do all the set-up on a fresh machine:
#   make train   - create .venv, install, run the digits distillation (CPU, minutes)
#   make test    - create .venv, install, run the test suite
#   make test-fast - the tests that are neither slow nor need Ray (~2 minutes): the edit loop
#   make test-drills - the whole-system and fault drills make test leaves out (~18 minutes);
#                    make test-all runs both
#   make lint      - ruff and mypy (.ci/run runs it before the tests)
#   make ship-cache - remake the digits default run's teacher pairs and one-step stage that the
#                    package ships (nitro_dist/digits/weights/cache/), after a change to either
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= PASSIVE
export WANDB_MODE ?= offline
# the venv's tools first on PATH: torch builds DeepSpeed's C++ op with whichever `ninja` is on
# PATH, and two ninja versions (pip's in the venv, the system's) take each other's build logs for
# stale and rebuild it (~3 CPU-minutes a time); tests/conftest.py does the same for pytest
WITH_VENV := PATH=$(abspath $(VENV))/bin:$$PATH
# two pytest-xdist workers; groups (the Ray block, a module's shared fixture) stay on one worker
PYTEST := $(PY) -m pytest -q -n 2 --dist loadgroup

.PHONY: setup train test test-fast test-drills test-all lint ship-cache
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 first (local-disk wheels here; the CUDA 13 build, which
	# also runs on CPU): torchvision lets clean-fid (the eval extra) import, so its tests run.
	# Costs ~4.5 GB of nvidia/triton wheels over the CPU torch 2.13.0 (2.5 GB -> 7.0 GB venv).
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev,eval]"
	# DeepSpeed's CPU shared-memory all-reduce is a C++ op compiled on first use (~1.5 CPU-minutes);
	# build it now, not inside the first training run or test (cached in ~/.cache/torch_extensions)
	$(WITH_VENV) $(PY) -c "from deepspeed.accelerator import get_accelerator as a; \
	  a().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

train: setup
	$(WITH_VENV) $(PY) -m nitro_dist.train $(ARGS)

# the suite without the whole-system and fault drills (marker `drill`: `make test-drills`)
test: setup
	$(PYTEST) -m "not drill"

test-fast: setup
	$(PYTEST) -m "not slow and not ray"

test-drills: setup
	$(PYTEST) -m drill

# everything: the suite and the drills in one session (one Ray cluster)
test-all: setup
	$(PYTEST)

# the default run's two deterministic stages (seed 0, its 2 workers), computed afresh in an empty
# cache and copied into the package: a fresh clone's `make train` loads them (nitro_dist/stage_cache.py)
SHIP := nitro_dist/digits/weights/cache
ship-cache: setup
	rm -rf $(SHIP) build/ship-cache build/ship-run
	NITRO_CACHE=$(abspath build/ship-cache) $(WITH_VENV) $(PY) -m nitro_dist.train \
	  train.iterations=0 train.eval_images=10 logging.wandb=false distributed.storage_path=build/ship-run
	mkdir -p $(SHIP)
	cp -r build/ship-cache/teacher_pairs build/ship-cache/one_step_init $(SHIP)/
	rm -rf build/ship-cache build/ship-run

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m mypy
