#!/usr/bin/env bash
# Run a grape-ds experiment with the deepspeed launcher over a hostfile.
#
#   bash launchers/run_hostfile.sh [--dry-run] [--set key=value ...]
#
# --dry-run prints the hostfile, environment and exact command, checks the config for the world size,
# and runs nothing. Without it the script also checks that every host resolves and answers on its ssh
# port and that the master port is free, then starts the launcher. Knobs (environment variables):
HOSTFILE=${HOSTFILE:-launchers/hostfile.example}  # "<host> slots=<n>" lines
CONFIG=${CONFIG:-yaml_configs/demo.yaml}          # the experiment
RANKS_PER_NODE=${RANKS_PER_NODE:-0}               # >0 overrides every host's slots
MASTER_ADDR=${MASTER_ADDR:-}                      # default: the first host (127.0.0.1 if it is this one)
MASTER_PORT=${MASTER_PORT:-29500}
SETS=${SETS:-}                                    # extra overrides, space-separated: "train.max_steps=100 ..."
PYTHON=${PYTHON:-}                                # default: .venv/bin/python if present, else python3
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -n $PYTHON ]] || { [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python || PYTHON=python3; }
export DS_ACCELERATOR=${DS_ACCELERATOR:-$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
args=(hostfile --hostfile "$HOSTFILE" --config "$CONFIG" --ranks-per-node "$RANKS_PER_NODE"
      --master-port "$MASTER_PORT")
[[ -n $MASTER_ADDR ]] && args+=(--master-addr "$MASTER_ADDR")
for s in $SETS; do args+=(--set "$s"); done
exec "$PYTHON" -m grape_ds.launch "${args[@]}" "$@"
