# mamlrun: `make install` then `make test`. `make help` lists every target.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision: a matching pair. 2.14.1/0.29.1 lie on local disk on the CPU machines.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: help install test test-fast train lint clean bench gpu-check cluster-up cluster-down \
        cluster-env

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "mamlrun needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

install: $(BIN)/python  ## create .venv and install mamlrun with everything it needs (idempotent)
	$(BIN)/python -m pip install -q $(TORCH)
	@# learn2learn 0.2.0 ships only an sdist whose pre-generated C files fail on Python >= 3.11:
	@# re-cythonize its sources with a current Cython, without build isolation.
	$(BIN)/python -c 'import learn2learn' 2>/dev/null || { \
	  $(BIN)/python -m pip install -q cython numpy && \
	  $(BIN)/python -m pip install -q --no-build-isolation \
	    --config-settings=--build-option=build_ext learn2learn==0.2.0; }
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/mamlrun --help > /dev/null && echo "mamlrun installed in $(VENV): source $(BIN)/activate"

test:  ## run the test suite (its files spread over the cores: pytest-xdist)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

train:  ## meta-train MAML on sinusoid with the paper's settings (pass ARGS="key=value ...")
	$(BIN)/mamlrun train $(ARGS)

bench:  ## benchmark meta-training throughput
	$(BIN)/mamlrun bench $(ARGS)

gpu-check:  ## on a CUDA machine: timed full Omniglot 5w1s run, GPU tests (OMNIGLOT=dir; STEPS="omniglot tests tf32 bench")
	PYTHON=$(BIN)/python bash scripts/gpu_check.sh $(STEPS)

cluster-up:  ## start a single-node SLURM cluster on this machine, state in .cluster/ (root: installs slurm-wlm, munge)
	bash scripts/cluster.sh up

cluster-down:  ## stop it, cancelling its jobs
	bash scripts/cluster.sh down

cluster-env:  ## the line that points SLURM's commands at it: eval "$(make -s cluster-env)"
	@bash scripts/cluster.sh env

lint:  ## ruff check and format check
	$(BIN)/ruff check mamlrun hydra_plugins tests
	$(BIN)/ruff format --check mamlrun hydra_plugins tests

clean:  ## remove caches and the venv (outputs/ is kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info mamlrun/__pycache__ tests/__pycache__
