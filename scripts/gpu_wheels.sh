#!/usr/bin/env bash
# Build the folder of wheels that scripts/gpu_check.sh --wheels installs on a GPU machine that has
# CUDA PyTorch, transformers, tensorboard, tokenizers and numpy but not deepspeed or datasets, and no
# network (../shared/reference/GPU_DEVICE.md). Run here, in the project's .venv; about 6 MB.
#
#   scripts/gpu_wheels.sh [DIR]        (default DIR: .whl, ignored by git; carry it with the device tool)
#
# DeepSpeed is built as a pure-Python wheel (DS_BUILD_OPS=0): its ops compile on first use with the
# GPU machine's nvcc. The versions are the ones installed in .venv, so the GPU run uses what the tests
# here used. Pure-Python dependencies the GPU image lacks are downloaded for CPython 3.12 / manylinux.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
PY="${PYTHON:-.venv/bin/python}"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p "$dir"
rm -f "$dir"/*.whl
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "deepspeed==$(version deepspeed)"
deps=(hjson "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)"
      "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
      "datasets==$(version datasets)" "dill==$(version dill)" "multiprocess==$(version multiprocess)")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" "${deps[@]}"
ls -1 "$dir"
du -sh "$dir"
