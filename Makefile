# grape-ds: `make demo` runs the planted-corpus demo on 2 CPU ranks; `make test` runs the tests.
# Both create (or reuse) the virtual environment .venv first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NUM_RANKS ?= 2
CONFIG ?= yaml_configs/demo.yaml

export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

# torch is pinned to the local CPU build first, so nothing below pulls CUDA wheels.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m grape_ds check-config $(CONFIG) --world-size $(NUM_RANKS) --data $(ARGS) > /dev/null
	$(PY) -m grape_ds.launch own -- $(VENV)/bin/deepspeed --num_gpus $(NUM_RANKS) --module grape_ds.train --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not gpu and not slow" -q $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
