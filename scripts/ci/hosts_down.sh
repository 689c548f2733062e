#!/usr/bin/env bash
# hosts_down.sh - tear down what hosts_up.sh made in $HOSTS_DIR. Idempotent. Stops the sshd daemons by
# the process ids in their pid files (checked to still be sshd), then every process still inside one
# of its namespaces (by namespace name), deletes the namespaces (and their /etc/netns/<name>) and the
# bridge by name, and the folder.
#   HOSTS_KEEP_DIR=1  keep $HOSTS_DIR (logs)
set -uo pipefail
BASE=${HOSTS_DIR:?set HOSTS_DIR to the state folder hosts_up.sh used}
PREFIX=${HOSTS_PREFIX:-gds}
log() { echo "[hosts_down $(date +%T)] $*"; }
running() {  # running PID NAME: alive, not a zombie, and still NAME (guards against PID reuse)
  local s c; s=$(ps -o stat= -p "$1" 2>/dev/null); c=$(ps -o comm= -p "$1" 2>/dev/null)
  [[ -n $s && $s != Z* && $c == "$2" ]]
}
shopt -s nullglob
for pf in "$BASE"/sshd_*.pid; do
  pid=$(cat "$pf" 2>/dev/null)
  if [[ -n $pid ]] && running "$pid" sshd; then
    kill -TERM "$pid"
    for _ in $(seq 50); do running "$pid" sshd || break; sleep 0.1; done
    running "$pid" sshd && kill -KILL "$pid"
    log "stopped $(basename "$pf" .pid) ($pid)"
  fi
  rm -f "$pf"
done
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-h[0-9]+$"); do
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  if [[ -n ${pids// } ]]; then
    log "killing processes left in $ns: $pids"; kill -KILL $pids 2>/dev/null
  fi
  ip netns del "$ns" && log "deleted namespace $ns"
  rm -rf "/etc/netns/$ns"
done
ip link show "$PREFIX-br" >/dev/null 2>&1 && ip link del "$PREFIX-br" && log "deleted bridge $PREFIX-br"
for v in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^$PREFIX-v[0-9]+$"); do
  ip link del "$v" 2>/dev/null
done
if [[ ${HOSTS_KEEP_DIR:-0} == 1 ]]; then log "kept $BASE"; else rm -rf "$BASE"; fi
log "down"
