# Shared body of the SLURM batch scripts (sourced, not run). Knobs (environment variables, exported
# to the job by sbatch):
CONFIG=${CONFIG:-yaml_configs/demo.yaml}   # the experiment
SETS=${SETS:-}                             # extra overrides, space-separated: "train.max_steps=100 ..."
MODE=${MODE:-srun}                         # srun | deepspeed
SOCKET_IFNAME=${SOCKET_IFNAME:-}           # network interface of the ranks (GLOO_/NCCL_SOCKET_IFNAME)
REQUEUE=${REQUEUE:-1}                      # requeue the job when training stopped early on a signal
GRAPE_DS_ROOT=${GRAPE_DS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}  # the checkout (sbatch from its root)
PYTHON=${PYTHON:-}                         # default: $GRAPE_DS_ROOT/.venv/bin/python, else python3
set -euo pipefail
cd "$GRAPE_DS_ROOT"
[[ -n $PYTHON ]] || { [[ -x .venv/bin/python ]] && PYTHON=$PWD/.venv/bin/python || PYTHON=python3; }
if [[ -z ${DS_ACCELERATOR:-} ]]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then export DS_ACCELERATOR=cuda
  else export DS_ACCELERATOR=cpu; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$GRAPE_DS_ROOT/.cache/torch_extensions}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
args=(slurm --mode "$MODE" --config "$CONFIG" --socket-ifname "$SOCKET_IFNAME")
for s in $SETS; do args+=(--set "$s"); done
[[ $REQUEUE == 1 ]] && args+=(--requeue-stopped)
echo "[grape-ds] job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-no allocation} at $(date -Is)"
exec "$PYTHON" -m grape_ds.launch "${args[@]}" "$@"
