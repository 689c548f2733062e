#!/usr/bin/env bash
# slurm_down.sh - tear down the cluster made by slurm_up.sh.
# Idempotent: safe to run when nothing is up. Stops only the PIDs recorded in
# $SLURM_LOCAL_DIR/*.pid (never by process name). Leaves the Debian packages installed.
#   SLURM_KEEP_DIR=1  keep $SLURM_LOCAL_DIR (logs) instead of deleting it
set -uo pipefail

BASE=${SLURM_LOCAL_DIR:-/tmp/grape_ds_slurm}
CONF=$BASE/etc/slurm.conf
SYSCONF=/etc/slurm/slurm.conf
log() { echo "[slurm_down $(date +%T)] $*"; }
# running PID NAME: PID runs and is still NAME (guards against PID reuse). A zombie counts as
# gone: PID 1 in this sandbox reaps orphans only every ~1-2 s, and kill -0 still succeeds on it.
running() {
  local s c; s=$(ps -o stat= -p "$1" 2>/dev/null); c=$(ps -o comm= -p "$1" 2>/dev/null)
  [[ -n $s && $s != Z* && $c == "$2" ]]
}
name_of() { local b; b=$(basename "$1" .pid); echo "${b%%-*}"; }   # slurmd-cn1.pid -> slurmd
alive() { [[ -s $1 ]] && running "$(cat "$1")" "$(name_of "$1")"; }

stop_pidfile() {   # SIGTERM, wait up to 15 s, then SIGKILL
  local pf=$1 name pid
  [[ -s $pf ]] || { rm -f "$pf"; return 0; }
  name=$(name_of "$pf"); pid=$(cat "$pf")
  if running "$pid" "$name"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do running "$pid" "$name" || break; sleep 0.1; done
    if running "$pid" "$name"; then log "$name ($pid) ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.2; fi
    log "stopped $(basename "$pf" .pid) ($pid)"
  fi
  rm -f "$pf"
}

# 1. cancel every job first, so each slurmstepd and its tasks end through slurm itself
#    (slurmstepd is not a child of slurmd: killing slurmd alone would orphan running jobs)
if alive "$BASE/slurmctld.pid" && [[ -f $CONF ]]; then
  export SLURM_CONF=$CONF
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [[ -n ${jobs// } ]]; then
    log "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null
    for _ in $(seq 150); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
    [[ -z $(squeue -h -o %i 2>/dev/null) ]] || log "WARNING: jobs still listed: $(squeue -h -o '%i %T' | tr '\n' ' ')"
  fi
fi

# 2. daemons, in reverse start order (munged only if slurm_up.sh started it)
shopt -s nullglob
for pf in "$BASE"/slurmd*.pid; do stop_pidfile "$pf"; done
stop_pidfile "$BASE/slurmctld.pid"   # its child slurmscriptd exits with it
stop_pidfile "$BASE/munged.pid"

# 3. files outside $BASE that slurm_up.sh touched
if [[ -L $SYSCONF && $(readlink "$SYSCONF") == "$CONF" ]]; then rm -f "$SYSCONF"; fi
if grep -q '# slurm_local$' /etc/hosts 2>/dev/null; then
  # /etc/hosts may be a bind mount: rewrite it in place rather than replace the file
  tmp=$(mktemp); grep -v '# slurm_local$' /etc/hosts > "$tmp"; cat "$tmp" > /etc/hosts; rm -f "$tmp"
fi
if [[ ${SLURM_KEEP_DIR:-0} == 1 ]]; then log "kept $BASE"; else rm -rf "$BASE"; fi
log "down"
