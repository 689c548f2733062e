"""Cluster launches: the ``deepspeed`` launcher over a hostfile, and SLURM jobs (srun or deepspeed).

The scripts in ``launchers/`` are thin knob wrappers around this module, so that everything they decide
(hosts, ranks, master address and port, the exact commands) is computed in one place, checked before
an allocation is spent, and printed by ``--dry-run``:

    python -m grape_ds.launch hostfile --hostfile H --config C [--dry-run] [--set k=v ...]
    python -m grape_ds.launch slurm --config C [--mode srun|deepspeed] [--dry-run] [--set k=v ...]
    python -m grape_ds.launch own -- deepspeed ...   (run a launcher command, owning its process tree)

Before anything starts, the config is validated for the launch's world size (batch arithmetic
included), every host of a hostfile must resolve and answer on its ssh port, and the master port
must be free. Failures name the host, the port or the key and exit with status 2.

**Stopping a job.** The ``deepspeed`` launcher does not pass a SIGTERM sent to it on to the ranks (they
train on, orphaned), and a SIGTERM to its whole process group makes it exit 1 while the ranks are
still saving. So the launches here run it as a child in its own session and own its process tree
(:func:`run_owning_ranks`): one SIGTERM (or SIGINT, SIGUSR1) to the launching process asks every rank
on this host to save a checkpoint at its next step boundary and exit; the launch then exits with the
launcher's status, 0 for a clean stop (``<run>/status.json`` says ``stopped``). A second signal kills
the tree at once. Under SLURM's srun mode, srun passes signals to every task itself.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from grape_ds.distributed import LaunchError, check_port_free, is_local_address

__all__ = ["LaunchError", "Host", "expand_nodelist", "read_hostfile", "hostfile_text",
           "check_hosts_reachable", "slurm_master_port", "run_status", "run_owning_ranks", "main"]

@dataclass(frozen=True)
class Host:
    name: str
    slots: int


# ----------------------------------------------------------------------------------------------
# Node lists and hostfiles
# ----------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` -> ``["a[1,2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0:
            raise LaunchError(f"node list {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise LaunchError(f"node list {text!r}: unbalanced '['")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(body: str, nodelist: str) -> list[str]:
    out = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise LaunchError(f"node list {nodelist!r}: cannot read the range [{body}]")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise LaunchError(f"node list {nodelist!r}: range {item} runs backwards")
        width = len(lo)  # SLURM keeps leading zeros: node[01-03] -> node01 node02 node03
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``node[01-03,7],gpu-a[1-2]-x``) into host names, in order.

    The same result as ``scontrol show hostnames``, for use where SLURM is not installed (dry runs).
    """
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices = [_expand_range(p[1:-1], nodelist) if p.startswith("[") else [p] for p in pieces if p]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    if not hosts:
        raise LaunchError(f"node list {nodelist!r} names no host")
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """Host names of a SLURM node list: ``scontrol show hostnames`` when SLURM is installed."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


def read_hostfile(path: str | Path) -> list[Host]:
    """A DeepSpeed hostfile: ``<host> slots=<n>`` per line; ``#`` comments and blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"hostfile {path} does not exist (see launchers/hostfile.example)")
    hosts: list[Host] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise LaunchError(f"{path}:{lineno}: expected '<host> slots=<n>' with n >= 1, got {raw.strip()!r}")
        if any(h.name == m.group(1) for h in hosts):
            raise LaunchError(f"{path}:{lineno}: host {m.group(1)!r} is listed twice")
        hosts.append(Host(m.group(1), int(m.group(2))))
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no host")
    return hosts


def hostfile_text(hosts: list[Host]) -> str:
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


# ----------------------------------------------------------------------------------------------
# Pre-flight checks
# ----------------------------------------------------------------------------------------------

def check_hosts_reachable(hosts: list[Host], ssh_port: int = 22, timeout: float = 5.0) -> None:
    """Every non-local host must resolve and accept a TCP connection on its ssh port (the deepspeed
    launcher starts remote ranks over ssh/pdsh)."""
    for h in hosts:
        if is_local_address(h.name):
            continue
        try:
            addr = socket.gethostbyname(h.name)
        except OSError as exc:
            raise LaunchError(f"host {h.name!r} from the hostfile does not resolve ({exc}); fix the name "
                              "or add it to /etc/hosts") from None
        try:
            with socket.create_connection((addr, ssh_port), timeout=timeout):
                pass
        except OSError as exc:
            raise LaunchError(f"host {h.name!r} ({addr}) from the hostfile is not reachable on ssh port "
                              f"{ssh_port} ({exc}); the deepspeed launcher needs passwordless ssh to every "
                              "host") from None


def check_config(config: str, sets: list[str], world_size: int) -> None:
    """Validate the experiment for this world size before anything is launched, and pre-flight it
    (run directory, resume, tokenizer: :mod:`grape_ds.preflight`; the data is packed by the ranks)."""
    from grape_ds.config import ConfigError, load_config
    from grape_ds.preflight import PreflightError, preflight
    try:
        cfg = load_config(config, sets, world_size=world_size)
    except ConfigError as exc:
        raise LaunchError(f"config error for world size {world_size}: {exc}") from None
    try:
        preflight(cfg, world_size)
    except PreflightError as exc:
        raise LaunchError(f"pre-flight error: {exc}") from None


def run_status(run_dir: Path) -> dict | None:
    """``<run>/status.json`` written by rank 0 when training ends: ``{"state": "finished"|"stopped", ...}``."""
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def _train_args(config: str, sets: list[str]) -> list[str]:
    args = ["--module", "grape_ds.train", "--config", config]
    for s in sets:
        args += ["--set", s]
    return args


def deepspeed_command(hostfile: Path, hosts: list[Host], master_addr: str, master_port: int,
                      config: str, sets: list[str]) -> list[str]:
    cmd = [_deepspeed_bin(), "--hostfile", str(hostfile), "--master_addr", master_addr,
           "--master_port", str(master_port)]
    if len(hosts) == 1:
        # one host: the launcher starts the ranks itself, no ssh (and no ssh check against it)
        cmd.append("--no_ssh_check")
    return cmd + _train_args(config, sets)


def _deepspeed_bin() -> str:
    local = Path(sys.executable).parent / "deepspeed"
    return str(local) if local.exists() else "deepspeed"


def _print_plan(title: str, hostfile: str | None, commands: list[list[str]], env: dict[str, str]) -> None:
    print(f"# {title}")
    if hostfile is not None:
        print("# hostfile:")
        print(hostfile, end="")
    if env:
        print("# environment:")
        for k, v in env.items():
            print(f"export {k}={shlex.quote(v)}")
    print("# commands:")
    for c in commands:
        print(shlex.join(c))
    sys.stdout.flush()


def _run_dir(config: str, sets: list[str], world_size: int) -> Path:
    from grape_ds.config import load_config
    return load_config(config, sets, world_size=world_size).run_dir


def launch_hostfile(args: argparse.Namespace) -> int:
    hosts = read_hostfile(args.hostfile)
    if args.ranks_per_node:
        hosts = [Host(h.name, args.ranks_per_node) for h in hosts]
    world = sum(h.slots for h in hosts)
    master = args.master_addr or ("127.0.0.1" if is_local_address(hosts[0].name) else hosts[0].name)
    check_config(args.config, args.sets, world)
    hostfile = Path(args.hostfile)
    if args.ranks_per_node:  # the launcher reads slots from the file: write the one we mean
        run_dir = _run_dir(args.config, args.sets, world)
        hostfile = run_dir / "launch" / "hostfile"
    cmd = deepspeed_command(hostfile, hosts, master, args.master_port, args.config, args.sets)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    _print_plan(f"{len(hosts)} host(s), {world} rank(s), master {master}:{args.master_port}",
                hostfile_text(hosts), [cmd], env)
    if args.dry_run:
        return 0
    check_hosts_reachable(hosts)
    check_port_free(master, args.master_port, "set MASTER_PORT to a free port")
    if args.ranks_per_node:
        hostfile.parent.mkdir(parents=True, exist_ok=True)
        hostfile.write_text(hostfile_text(hosts))
    os.environ.update(env)
    return run_owning_ranks(cmd)


def is_rank_command(argv: list[str]) -> bool:
    """Whether a command line runs one grape-ds rank (``python [-u] -m grape_ds.train ...``, ``grape-ds
    train ...``), not a launcher that merely names the module (``... launch --module grape_ds.train``)."""
    for a, b in zip(argv, argv[1:]):
        if (a == "-m" and b == "grape_ds.train") or (a.endswith("grape-ds") and b == "train"):
            return True
    return any(a.endswith("grape_ds/train.py") for a in argv)


def _local_ranks(pid: int) -> list:
    """The grape-ds rank processes below ``pid`` (psutil processes)."""
    import psutil
    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for p in below:
        try:
            if is_rank_command(p.cmdline()):
                ranks.append(p)
        except psutil.Error:
            continue
    return ranks


def run_owning_ranks(cmd: list[str]) -> int:
    """Run a launcher command (``deepspeed ...``) as a child in its own session and return its exit
    status. The first SIGTERM, SIGINT or SIGUSR1 this process receives is passed as SIGTERM to every
    grape-ds rank below it on this host (each saves a checkpoint at its next step boundary and exits 0,
    so the launcher exits 0); a second one kills the whole tree (SIGKILL)."""
    import psutil
    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if len(received) == 1:
            ranks = _local_ranks(proc.pid)
            print(f"[grape-ds] {signal.Signals(signum).name}: asking {len(ranks)} rank(s) to save a "
                  "checkpoint and stop (signal again to kill them at once)", file=sys.stderr, flush=True)
            for p in ranks:
                try:
                    p.send_signal(signal.SIGTERM)
                except psutil.Error:
                    pass
        else:
            print("[grape-ds] second signal: killing the job", file=sys.stderr, flush=True)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    return proc.wait()


def slurm_master_port(job_id: int) -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes do not collide."""
    return 20000 + job_id % 10000


def _slurm_env(name: str, override: str | int | None) -> str:
    value = override if override is not None else os.environ.get(name)
    if value is None:
        raise LaunchError(f"${name} is not set: run inside a SLURM allocation (sbatch/salloc), or pass "
                          "--nodelist/--ntasks-per-node/--job-id with --dry-run to see the plan")
    return str(value)


def launch_slurm(args: argparse.Namespace) -> int:
    nodelist = _slurm_env("SLURM_JOB_NODELIST", args.nodelist)
    per_node = int(_slurm_env("SLURM_NTASKS_PER_NODE", args.ntasks_per_node).split("(")[0])
    job_id = int(_slurm_env("SLURM_JOB_ID", args.job_id))
    hosts = [Host(h, per_node) for h in (expand_nodelist(nodelist) if args.dry_run and args.nodelist
                                          else slurm_hostnames(nodelist))]
    world = len(hosts) * per_node
    master, port = hosts[0].name, args.master_port or slurm_master_port(job_id)
    check_config(args.config, args.sets, world)
    run_dir = _run_dir(args.config, args.sets, world)
    logs = run_dir / "slurm"
    env = {"MASTER_ADDR": master, "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if args.mode == "srun":
        # one task per rank; each task's rank comes from SLURM's own variables
        rank_env = "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS"
        train = shlex.join([sys.executable, "-m", "grape_ds.train", "--config", args.config,
                            *itertools.chain.from_iterable(("--set", s) for s in args.sets)])
        cmd = ["srun", "--kill-on-bad-exit=1", f"--nodes={len(hosts)}", f"--ntasks-per-node={per_node}",
               "--open-mode=append",  # a requeued job keeps the earlier attempts' logs
               f"--output={logs}/job%j-rank%t.log", "bash", "-c", f"export {rank_env}; exec {train}"]
        hostfile = None
    else:
        hostfile_path = logs / f"hostfile.{job_id}"
        hostfile = hostfile_text(hosts)
        cmd = deepspeed_command(hostfile_path, hosts, master, port, args.config, args.sets)
    _print_plan(f"SLURM job {job_id}: {len(hosts)} node(s) x {per_node} rank(s) = {world}, "
                f"master {master}:{port}, mode {args.mode}, logs in {logs}", hostfile, [cmd], env)
    if args.dry_run:
        return 0
    check_port_free(master, port, "pass --master-port, or resubmit (the port follows the job id)")
    logs.mkdir(parents=True, exist_ok=True)
    if hostfile is not None:
        (logs / f"hostfile.{job_id}").write_text(hostfile)
    os.environ.update(env)
    # srun passes a signal to every task itself; the deepspeed launcher needs its tree owned
    rc = subprocess.run(cmd).returncode if args.mode == "srun" else run_owning_ranks(cmd)
    status = run_status(run_dir)
    print(f"[grape-ds] ranks exited with {rc}; run status: {status}", flush=True)
    if rc == 0 and args.requeue_stopped and status and status["state"] == "stopped":
        # stopped on a signal (time limit, preemption): put the job back in the queue; the next start
        # resumes from the checkpoint it just saved
        print(f"[grape-ds] requeueing job {job_id} to resume from step {status['step']}", flush=True)
        subprocess.run(["scontrol", "requeue", str(job_id)], check=False)
    return rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m grape_ds.launch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hostfile", help="the deepspeed launcher over a hostfile")
    h.add_argument("--hostfile", required=True)
    h.add_argument("--ranks-per-node", type=int, default=0, help="override the hostfile's slots")
    h.add_argument("--master-addr", default="", help="default: the first host (127.0.0.1 if local)")
    h.add_argument("--master-port", type=int, default=29500)
    s = sub.add_parser("slurm", help="inside a SLURM allocation: srun (default) or the deepspeed launcher")
    s.add_argument("--mode", choices=("srun", "deepspeed"), default="srun")
    s.add_argument("--nodelist", help="default: $SLURM_JOB_NODELIST")
    s.add_argument("--ntasks-per-node", help="default: $SLURM_NTASKS_PER_NODE")
    s.add_argument("--job-id", help="default: $SLURM_JOB_ID")
    s.add_argument("--master-port", type=int, default=0, help="default: 20000 + job id %% 10000")
    s.add_argument("--requeue-stopped", action="store_true",
                   help="requeue the job when training stopped early on a signal (needs sbatch --requeue)")
    o = sub.add_parser("own", help="run a launcher command (after --), owning its process tree: one "
                       "SIGTERM here stops every rank cleanly")
    o.add_argument("cmd", nargs=argparse.REMAINDER)
    for q in (h, s):
        q.add_argument("--config", required=True)
        q.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
        q.add_argument("--dry-run", action="store_true", help="print the hostfile and commands, run nothing")
    args = p.parse_args(argv)
    if args.command == "own":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            p.error("own: give the command to run after --")
        return run_owning_ranks(cmd)
    try:
        return launch_hostfile(args) if args.command == "hostfile" else launch_slurm(args)
    except LaunchError as exc:
        print(f"grape-ds launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
