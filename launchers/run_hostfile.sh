#!/usr/bin/env bash
# Run a grape-ds experiment with the deepspeed launcher over a hostfile.
#
#   bash launchers/run_hostfile.sh [--dry-run] [--set key=value ...]
#
# --dry-run reads the hostfile as the deepspeed launcher does, prints it, the environment (with the
# .deepspeed_env every host gets) and the exact command, checks the config for the world size, and
# runs nothing. Without it, on several hosts the script first asks each one over ssh (as pdsh will)
# whether it can run its ranks: same checkout and Python path, same grape-ds sources, and no loopback
# trap (a master address or host name that resolves to 127.x while the hosts are separate machines);
# then it checks the master port and starts the launcher. Knobs (environment variables):
HOSTFILE=${HOSTFILE:-launchers/hostfile.example}  # "<host> slots=<n>" lines
CONFIG=${CONFIG:-yaml_configs/demo.yaml}          # the experiment
RANKS_PER_NODE=${RANKS_PER_NODE:-0}               # >0 overrides every host's slots
MASTER_ADDR=${MASTER_ADDR:-}                      # default: the first host (127.0.0.1 if it is this one)
MASTER_PORT=${MASTER_PORT:-29500}
SOCKET_IFNAME=${SOCKET_IFNAME:-}                  # network interface of the ranks on every host (eth1):
                                                  #   GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME
SETS=${SETS:-}                                    # extra overrides, space-separated: "train.max_steps=100 ..."
PYTHON=${PYTHON:-}                                # default: .venv/bin/python if present, else python3
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -n $PYTHON ]] || { [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python || PYTHON=python3; }
export DS_ACCELERATOR=${DS_ACCELERATOR:-$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
args=(hostfile --hostfile "$HOSTFILE" --config "$CONFIG" --ranks-per-node "$RANKS_PER_NODE"
      --master-port "$MASTER_PORT" --socket-ifname "$SOCKET_IFNAME")
[[ -n $MASTER_ADDR ]] && args+=(--master-addr "$MASTER_ADDR")
for s in $SETS; do args+=(--set "$s"); done
exec "$PYTHON" -m grape_ds.launch "${args[@]}" "$@"
