#!/usr/bin/env bash
# Run a grape-ds experiment on this one machine: one rank per GPU, or NUM_RANKS CPU ranks (gloo).
#
#   bash launchers/run_local.sh [--set key=value ...] [--no-resume] [--stop-at STEP]
#
# Knobs (environment variables):
CONFIG=${CONFIG:-yaml_configs/demo.yaml}
NUM_RANKS=${NUM_RANKS:-}          # default: the number of GPUs, or 2 on a CPU-only machine
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-}                # default: .venv/bin/python if present, else python3
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -n $PYTHON ]] || { [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python || PYTHON=python3; }
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if ((gpus > 0)); then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
  NUM_RANKS=${NUM_RANKS:-$gpus}
else
  export DS_ACCELERATOR=cpu
  NUM_RANKS=${NUM_RANKS:-2}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}       # one thread per rank: ranks share the cores
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
DEEPSPEED=$(dirname "$(command -v "$PYTHON")")/deepspeed
[[ -x $DEEPSPEED ]] || DEEPSPEED=deepspeed
cmd=("$DEEPSPEED" --num_gpus "$NUM_RANKS" --master_port "$MASTER_PORT" --module grape_ds.train --config "$CONFIG" "$@")
# pre-flight before any rank starts: config, run directory, resume, tokenizer, and every record of the
# data (packed here once; the ranks reuse it)
"$PYTHON" -m grape_ds check-config "$CONFIG" --world-size "$NUM_RANKS" --data "$@" > /dev/null
echo "# $NUM_RANKS rank(s) on $DS_ACCELERATOR: ${cmd[*]}"
# owns the launcher's process tree: one SIGTERM to this script's process saves and stops every rank
# (exit 0); a second one kills them
exec "$PYTHON" -m grape_ds.launch own -- "${cmd[@]}"
