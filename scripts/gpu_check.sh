#!/usr/bin/env bash
# The prepared GPU check (README, "Performance"): on one GPU with NCCL, a GPT-2 124M bf16 ZeRO-2 GRAPE
# run, a stop and exact resume, the frozen-probe equality, then `grape-ds bench throughput` for 124M.
# Sized for under 8 minutes on one H200 (an estimate: it has not run on a GPU yet). With --cpu it
# runs the same logic on a tiny model (gloo), with the device check on (GRAPE_DS_CHECK_DEVICES=1), so
# it is tested on machines without a GPU (tests/test_gpu_check.py).
#
#   scripts/gpu_check.sh [--cpu] [--wheels DIR] [--out DIR] [-- extra args for scripts/gpu_check.py]
#
#   --wheels DIR  install every wheel in DIR first, without an index or network (pip --target), for a
#                 machine that lacks deepspeed/datasets; scripts/gpu_wheels.sh builds such a folder
#   --out DIR     results: DIR/gpu_check.json (every part's figures, pass or fail) and DIR/runs/
#                 (default: $OUT when set, else runs/gpu_check); `-- --runs D` puts the runs in D
# Python: $PYTHON, else .venv/bin/python when it exists, else python3.
# Exit status: 0 when every check held, 1 when one did not, 2 on bad arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
cpu=0
wheels=""
out="${OUT:-runs/gpu_check}"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1 ;;
    --wheels) [ $# -ge 2 ] || { echo "gpu_check.sh: --wheels needs a folder" >&2; exit 2; }; wheels="$2"; shift ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }; out="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# the project's .venv where there is one (this machine), else the machine's python3 (the GPU image)
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if [ -n "$wheels" ]; then
  compgen -G "$wheels/*.whl" > /dev/null || { echo "gpu_check.sh: no .whl files in $wheels" >&2; exit 2; }
  site="${SITE_DIR:-$HOME/site}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
args=(--out "$out")
if [ "$cpu" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 GRAPE_DS_CHECK_DEVICES="${GRAPE_DS_CHECK_DEVICES:-1}"
  args+=(--cpu)
fi
exec "$PY" scripts/gpu_check.py "${args[@]}" "${extra[@]}"
