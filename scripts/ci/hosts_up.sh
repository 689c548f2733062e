#!/usr/bin/env bash
# hosts_up.sh - throw-away "hosts" for multi-node launch tests on one machine (needs root):
#   * HOSTS_NETNS=N (default 2): N network namespaces <prefix>-h1..hN on a private bridge <prefix>-br
#     (10.77.0.1/24 on the bridge, 10.77.0.1i on interface eth1 of host i), each with an sshd on port 22.
#     They share the file system (like a cluster with a shared home), so one checkout serves all; each
#     has its own /etc/hosts (/etc/netns/<ns>/hosts) where the host name is 127.0.1.1.
#   * HOSTS_LOOPBACK="cn1 cn2": names served by one sshd on 127.0.0.1:$LOOPBACK_SSH_PORT in this
#     namespace (emulated SLURM nodes that all live on 127.0.0.1).
# ssh goes through a wrapper named `ssh` in $HOSTS_DIR/bin (put it first on PATH; PDSH_RCMD_TYPE=ssh):
# the deepspeed launcher and pdsh call plain `ssh`, and OpenSSH reads ~/.ssh from the password
# database, so a wrapper with -F is the way to use a throw-away key without touching the real home.
# Everything lives in $HOSTS_DIR (required); hosts_down.sh removes it all by process id and by name.
# Packages (Debian): openssh-server, pdsh; installed if missing. Recipe: shared/reference/MULTINODE_NETNS.md.
set -euo pipefail
BASE=${HOSTS_DIR:?set HOSTS_DIR to a state folder}
PREFIX=${HOSTS_PREFIX:-gds}
NETNS=${HOSTS_NETNS:-2}
NET=${HOSTS_NET:-10.77.0}
LOOPBACK=${HOSTS_LOOPBACK:-}
LOOPBACK_SSH_PORT=${LOOPBACK_SSH_PORT:-2222}
log() { echo "[hosts_up $(date +%T)] $*"; }
die() { echo "[hosts_up] ERROR: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "needs root (network namespaces, sshd)"
here=$(cd "$(dirname "$0")" && pwd)

# ---------------------------------------------------------------- 1. packages
if ! command -v pdsh >/dev/null || [[ ! -x /usr/sbin/sshd ]]; then
  command -v apt-get >/dev/null || die "openssh-server and pdsh are missing and there is no apt-get"
  own_policy=0  # keep the packages' postinst from starting a system sshd
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  pkgs=(openssh-server openssh-client pdsh)
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; }
  ((own_policy)) && rm -f /usr/sbin/policy-rc.d
fi

# ---------------------------------------------------------------- 2. leftovers of an earlier run
HOSTS_DIR=$BASE HOSTS_PREFIX=$PREFIX bash "$here/hosts_down.sh" >/dev/null 2>&1 || true
mkdir -p "$BASE/bin" "$BASE/log" /run/sshd
chmod 0755 /run/sshd

# ---------------------------------------------------------------- 3. keys and ssh configuration
ssh-keygen -q -t ed25519 -N '' -C grape-ds-ci -f "$BASE/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -C grape-ds-ci-host -f "$BASE/host_ed25519"
cp "$BASE/id_ed25519.pub" "$BASE/authorized_keys"
sshd_conf() {  # sshd_conf NAME EXTRA-LINES
  cat > "$BASE/sshd_$1.conf" <<EOF
HostKey $BASE/host_ed25519
AuthorizedKeysFile $BASE/authorized_keys
PidFile $BASE/sshd_$1.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PrintMotd no
AcceptEnv LANG LC_*
$2
EOF
}
{
  if [[ -n $LOOPBACK ]]; then
    echo "Host $LOOPBACK"
    echo "  HostName 127.0.0.1"
    echo "  Port $LOOPBACK_SSH_PORT"
  fi
  cat <<EOF
Host *
  IdentityFile $BASE/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
  ConnectTimeout 10
EOF
} > "$BASE/ssh_config"
printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$BASE/ssh_config" > "$BASE/bin/ssh"
chmod +x "$BASE/bin/ssh"

wait_ssh() {  # wait_ssh HOST [netns]
  local i
  for i in $(seq 50); do
    if ${2:+ip netns exec "$2"} "$BASE/bin/ssh" "$1" true 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "sshd for $1 does not answer; see $BASE/log"
}

# ---------------------------------------------------------------- 4. network namespaces
if ((NETNS > 0)); then
  br=$PREFIX-br
  ip link add "$br" type bridge
  ip addr add "$NET.1/24" dev "$br"
  ip link set "$br" up
  for i in $(seq "$NETNS"); do
    ns=$PREFIX-h$i
    ip netns add "$ns"
    ip link add "$PREFIX-v$i" type veth peer name "$PREFIX-p$i"
    ip link set "$PREFIX-p$i" netns "$ns"
    ip link set "$PREFIX-v$i" master "$br"
    ip link set "$PREFIX-v$i" up
    ip netns exec "$ns" ip link set "$PREFIX-p$i" name eth1   # the same interface name on every host
    ip netns exec "$ns" ip addr add "$NET.1$i/24" dev eth1
    ip netns exec "$ns" ip link set eth1 up
    ip netns exec "$ns" ip link set lo up
    # `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts: each host resolves its own name to
    # 127.0.1.1, as Debian and Ubuntu write it (the loopback trap of multi-host gloo, on any machine)
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$(hostname)" > "/etc/netns/$ns/hosts"
    sshd_conf "h$i" "ListenAddress $NET.1$i"
    nohup ip netns exec "$ns" /usr/sbin/sshd -D -f "$BASE/sshd_h$i.conf" -E "$BASE/log/sshd_h$i.log" \
      </dev/null >/dev/null 2>&1 &
    echo $! > "$BASE/sshd_h$i.pid"   # ip netns exec execs sshd: the same process
    echo "$ns" >> "$BASE/netns"
  done
  for i in $(seq "$NETNS"); do wait_ssh "$NET.1$i" "$PREFIX-h1"; done
  log "hosts: $(for i in $(seq "$NETNS"); do printf '%s=%s.1%s ' "$PREFIX-h$i" "$NET" "$i"; done)(eth1 in each)"
fi

# ---------------------------------------------------------------- 5. loopback names
if [[ -n $LOOPBACK ]]; then
  sshd_conf loopback "ListenAddress 127.0.0.1:$LOOPBACK_SSH_PORT"
  nohup /usr/sbin/sshd -D -f "$BASE/sshd_loopback.conf" -E "$BASE/log/sshd_loopback.log" </dev/null >/dev/null 2>&1 &
  echo $! > "$BASE/sshd_loopback.pid"
  for h in $LOOPBACK; do wait_ssh "$h"; done
  log "loopback ssh for: $LOOPBACK (127.0.0.1:$LOOPBACK_SSH_PORT)"
fi
log "up: export PATH=$BASE/bin:\$PATH PDSH_RCMD_TYPE=ssh"
