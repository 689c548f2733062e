#!/usr/bin/env bash
# slurm_up.sh - stand up a throw-away SLURM cluster on this one machine
# (munged + slurmctld + slurmd; Debian 12 packages, slurm 22.05); no systemd needed.
# Idempotent: re-running while the cluster is up only re-checks it and exits 0;
# leftovers of a half-finished earlier run are stopped (by recorded PID) and replaced.
# Must run as root. Undo with slurm_down.sh (same SLURM_LOCAL_DIR).
#
# Env knobs:
#   SLURM_LOCAL_DIR    state/log/pid dir                       (default /tmp/grape_ds_slurm)
#   SLURM_NODES        1 = one node named `hostname -s`;      (default 1)
#                      N>1 = N emulated nodes cn1..cnN, one slurmd each, all on this machine
#                      and each advertising the whole machine (CPUs oversubscribed)
#   SLURM_MEM_MARGIN   MiB kept back from RealMemory           (default 1024)
#   SLURM_CTLD_PORT / SLURM_SLURMD_PORT                        (default 6817 / 6818; node i of N uses 6818+i)
set -euo pipefail

BASE=${SLURM_LOCAL_DIR:-/tmp/grape_ds_slurm}
NODES=${SLURM_NODES:-1}
MARGIN=${SLURM_MEM_MARGIN:-1024}
CTLD_PORT=${SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_SLURMD_PORT:-6818}
CONF=$BASE/etc/slurm.conf
SYSCONF=/etc/slurm/slurm.conf
T0=$(date +%s.%N)

log() { echo "[slurm_up $(date +%T)] $*"; }
die() { echo "[slurm_up] ERROR: $*" >&2; exit 1; }
# alive PIDFILE: its PID runs and is still the daemon the file is named after (slurmd-cn1.pid ->
# slurmd), which guards against PID reuse. A zombie counts as gone: PID 1 in this sandbox reaps
# orphans only every ~1-2 s, and kill -0 still succeeds on a zombie.
alive() {
  [[ -s $1 ]] || return 1
  local pid s c want; pid=$(cat "$1"); want=$(basename "$1" .pid); want=${want%%-*}
  s=$(ps -o stat= -p "$pid" 2>/dev/null); c=$(ps -o comm= -p "$pid" 2>/dev/null)
  [[ -n $s && $s != Z* && $c == "$want" ]]
}
all_idle() {   # every configured node idle
  local n; n=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2=="idle"' | sort -u | wc -l)
  [[ $n == "$NODES" ]]
}

[[ $(id -u) -eq 0 ]] || die "must run as root"
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "SLURM_NODES must be a positive integer"

# ---------------------------------------------------------------- 0. already up?
if [[ -f $CONF ]] && alive "$BASE/slurmctld.pid" && all_idle; then
  ok=1; for f in "$BASE"/slurmd*.pid; do alive "$f" || ok=0; done
  if ((ok)); then log "cluster already up: $(sinfo -h -o '%N %T %c' | tr '\n' ' ')"; exit 0; fi
fi

# ---------------------------------------------------------------- 1. packages
need=()
for b in munged slurmctld slurmd sbatch; do command -v "$b" >/dev/null || need+=("$b"); done
if ((${#need[@]})); then
  log "installing packages (missing: ${need[*]})"
  # keep the maintainer scripts from starting the daemons themselves (Docker-style images
  # already ship a policy-rc.d that says 101; add one only if there is none)
  own_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
  ((own_policy)) && rm -f /usr/sbin/policy-rc.d
fi

# ---------------------------------------------------------------- 2. leftovers of an earlier run
mkdir -p "$BASE"
# cancel its jobs first: slurmstepd is not a child of slurmd, and a cold-started slurmctld
# forgets the jobs, so killing the daemons alone would orphan running job processes
if [[ -f $CONF ]] && alive "$BASE/slurmctld.pid"; then
  jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [[ -n ${jobs// } ]]; then
    log "cancelling leftover jobs: $jobs"; SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
    for _ in $(seq 150); do [[ -z $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
  fi
fi
for f in "$BASE"/slurmd*.pid "$BASE"/slurmctld.pid; do
  [[ -e $f ]] || continue
  if alive "$f"; then
    log "stopping stale $(basename "$f" .pid) $(cat "$f")"; kill "$(cat "$f")"
    for _ in $(seq 100); do alive "$f" || break; sleep 0.1; done
    if alive "$f"; then kill -KILL "$(cat "$f")"; fi
  fi
  rm -f "$f"
done
rm -rf "$BASE"/state "$BASE"/spool* "$BASE"/etc
mkdir -p "$BASE"/{etc,state,log}

# ---------------------------------------------------------------- 3. node names
HOST=$(hostname -s)
if ((NODES == 1)); then NAMES=("$HOST"); else NAMES=(); for i in $(seq "$NODES"); do NAMES+=("cn$i"); done; fi
# job scripts use node names as MASTER_ADDR / hostfile entries, so they must resolve.
# Drop our line from an earlier run first (/etc/hosts may be a bind mount: rewrite in place)
if grep -q '# slurm_local$' /etc/hosts; then
  tmp=$(mktemp); grep -v '# slurm_local$' /etc/hosts > "$tmp"; cat "$tmp" > /etc/hosts; rm -f "$tmp"
fi
unresolved=(); for h in "${NAMES[@]}"; do getent hosts "$h" >/dev/null || unresolved+=("$h"); done
if ((${#unresolved[@]})); then
  echo "127.0.0.1 ${unresolved[*]} # slurm_local" >> /etc/hosts
  log "added to /etc/hosts: ${unresolved[*]}"
fi

# ---------------------------------------------------------------- 4. munge
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge; chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "a munged is already answering; reusing it"
else
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  # setpriv execs (no extra fork, unlike runuser/su), so $! is munged's own PID
  nohup setpriv --reuid=munge --regid=munge --init-groups \
        /usr/sbin/munged --foreground --force >"$BASE/log/munged.log" 2>&1 </dev/null &
  echo $! > "$BASE/munged.pid"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged did not come up; see $BASE/log/munged.log"
  log "munged pid $(cat "$BASE/munged.pid")"
fi

# ---------------------------------------------------------------- 5. slurm.conf
# topology as slurmd itself sees it; memory minus a margin
HW=$(slurmd -C | head -1)            # NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
TOPO=$(grep -o 'CPUs=[0-9]* .*ThreadsPerCore=[0-9]*' <<<"$HW")
if ((NODES == 1)); then
  D_PID="$BASE/slurmd.pid"; D_SPOOL="$BASE/spool"; D_LOG="$BASE/log/slurmd.log"
  NODELINES="NodeName=$HOST NodeAddr=127.0.0.1 $TOPO RealMemory=$((MEM - MARGIN)) State=UNKNOWN"
  PARTNODES=$HOST
else
  # several slurmd on one host: Debian's build substitutes %n (node name) in these paths
  D_PID="$BASE/slurmd-%n.pid"; D_SPOOL="$BASE/spool-%n"; D_LOG="$BASE/log/slurmd-%n.log"
  NODELINES=""
  for i in $(seq "$NODES"); do
    NODELINES+="NodeName=cn$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) $TOPO RealMemory=$((MEM - MARGIN)) State=UNKNOWN"$'\n'
  done
  PARTNODES="cn[1-$NODES]"
fi
cat > "$CONF" <<EOF
# generated by slurm_up.sh - throw-away CI cluster, $NODES node(s) on $HOST
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$D_SPOOL
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$D_PID
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$D_LOG
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: plain process tracking, no task binding/confinement, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# default batch_sched_delay=3 makes back-to-back sbatch jobs wait ~3 s to start
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
# reject impossible requests at submit time instead of pending forever (Reason=PartitionConfig)
EnforcePartLimits=ALL
# Debian ships no /bin/mail; silences "Configured MailProg is invalid"
MailProg=/bin/true
$NODELINES
PartitionName=debug Nodes=$PARTNODES Default=YES MaxTime=INFINITE State=UP
EOF
# let plain `sbatch`/`srun` (no SLURM_CONF) find it; job steps inherit it the same way
if [[ -e $SYSCONF && ! -L $SYSCONF ]]; then
  log "NOTE: $SYSCONF exists and is not ours; leaving it: export SLURM_CONF=$CONF"
else
  mkdir -p /etc/slurm; ln -sfn "$CONF" "$SYSCONF"
fi
export SLURM_CONF=$CONF

# ---------------------------------------------------------------- 6. daemons
# -D: stay in the foreground so $! is the daemon's PID; -c: cold start (ignore old state)
nohup slurmctld -D -c -f "$CONF" >"$BASE/log/slurmctld.out" 2>&1 </dev/null &
echo $! > "$BASE/slurmctld.pid"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping | grep -q UP || { tail -20 "$BASE/log/slurmctld.log"; die "slurmctld not answering"; }
log "slurmctld pid $(cat "$BASE/slurmctld.pid")"

for n in "${NAMES[@]}"; do
  if ((NODES == 1)); then pf=$BASE/slurmd.pid; out=$BASE/log/slurmd.out; mkdir -p "$BASE/spool"
  else pf=$BASE/slurmd-$n.pid; out=$BASE/log/slurmd-$n.out; mkdir -p "$BASE/spool-$n"; fi
  nohup slurmd -D -N "$n" -f "$CONF" >"$out" 2>&1 </dev/null &
  echo $! > "$pf"      # slurmd writes the same PID there itself
done
for _ in $(seq 150); do all_idle && break; sleep 0.2; done
if ! all_idle; then
  tail -20 "$BASE"/log/slurmd*.log; sinfo -N; sinfo -R; die "not all nodes idle"
fi
log "slurmd pid(s) $(cat "$BASE"/slurmd*.pid | tr '\n' ' ')"
log "cluster up in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s: $(sinfo -h -o 'partition=%P nodes=%N state=%T cpus/node=%c mem/node=%m')"
