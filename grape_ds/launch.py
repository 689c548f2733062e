"""Cluster launches: the ``deepspeed`` launcher over a hostfile, and SLURM jobs (srun or deepspeed).

The scripts in ``launchers/`` are thin knob wrappers around this module, so that everything they decide
(hosts, ranks, master address and port, the exact commands) is computed in one place, checked before
an allocation is spent, and printed by ``--dry-run``:

    python -m grape_ds.launch hostfile --hostfile H --config C [--dry-run] [--set k=v ...]
    python -m grape_ds.launch slurm --config C [--mode srun|deepspeed] [--dry-run] [--set k=v ...]
    python -m grape_ds.launch own -- deepspeed ...   (run a launcher command, owning its process tree)

Before anything starts, the config is validated for the launch's world size (batch arithmetic
included), every host of a hostfile must resolve, and the master port must be free. A launch over
several hosts also asks each one over ssh, as pdsh will (:func:`probe_hosts`), whether it can run its
ranks: the same checkout and Python path, the same grape-ds sources, deepspeed, and none of the network
traps (:func:`check_hosts`: a loopback master address, a host name that resolves to loopback under
gloo, a missing socket interface). Failures name the host, the port or the key and exit with status 2.
The ranks' environment reaches the other hosts in a ``.deepspeed_env`` (:func:`deepspeed_env`).

**Stopping a job.** The ``deepspeed`` launcher does not pass a SIGTERM sent to it on to the ranks (they
train on, orphaned), and a SIGTERM to its whole process group makes it exit 1 while the ranks are
still saving. So the launches here run it as a child in its own session and own its process tree
(:func:`run_owning_ranks`): one SIGTERM (or SIGINT, SIGUSR1) to the launching process asks every rank
to save a checkpoint at its next step boundary and exit, over ssh on the other hosts of a multi-host
launch; the launch then exits with the launcher's status, 0 for a clean stop (``<run>/status.json``
says ``stopped``). A second signal kills the tree at once. Under SLURM the batch shell is this
process (the scripts ask for ``--signal=B:...``): in srun mode it passes the signal to srun, which
passes it to every task.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grape_ds.distributed import LaunchError, check_port_free, is_local_address
from grape_ds.rundir import RunPaths

__all__ = ["LaunchError", "Host", "expand_nodelist", "read_hostfile", "hostfile_text", "check_hosts_reachable",
           "probe_hosts", "check_hosts", "deepspeed_env", "slurm_tasks_per_node", "slurm_master_port",
           "run_status", "run_owning_ranks", "train_command", "TRAIN_MODULE", "main"]

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


# DeepSpeed's own rule (``deepspeed/launcher/runner.py``, ``_parse_hostfile``): each line, stripped, is
# blank, a comment ('#' first), or matches this with ``re.search`` (whatever follows the number is
# ignored: ``node slots=4 # four GPUs`` is 4 slots); anything else stops the launcher.
DS_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")


def read_hostfile(path: str | Path) -> list[Host]:
    """A DeepSpeed hostfile, read exactly as the ``deepspeed`` launcher reads it (same line splitting,
    same pattern :data:`DS_HOSTFILE_LINE`), so a file that passes here is one it accepts.

    Raises:
        LaunchError: a missing file, a line DeepSpeed rejects (``path:line``, the line, and what to
            write instead), a host listed twice, ``slots=0``, or no host at all.
    """
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"hostfile {path} does not exist (see launchers/hostfile.example)")
    hosts: list[Host] = []
    with path.open() as f:
        lines = f.readlines()  # as DeepSpeed does (universal newlines), not str.splitlines
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = DS_HOSTFILE_LINE.search(line)
        if not m:
            hint = ("; DeepSpeed allows no space around '=': write 'slots=N'"
                    if re.match(r"^\S+\s+slots\s*=\s*\d", line) else "")
            raise LaunchError(f"{path}:{lineno}: the deepspeed launcher cannot read {line!r}: expected "
                              f"'<host> slots=<n>'{hint}")
        if int(m.group(2)) < 1:
            raise LaunchError(f"{path}:{lineno}: {line!r} gives {m.group(1)} no rank (slots=0); remove the line")
        if any(h.name == m.group(1) for h in hosts):
            raise LaunchError(f"{path}:{lineno}: host {m.group(1)!r} is listed twice (the deepspeed launcher "
                              "refuses that)")
        hosts.append(Host(m.group(1), int(m.group(2))))
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no host")
    return hosts


def hostfile_text(hosts: list[Host]) -> str:
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


# ----------------------------------------------------------------------------------------------
# Pre-flight checks
# ----------------------------------------------------------------------------------------------

def check_hosts_reachable(hosts: list[Host]) -> None:
    """Every non-local host of the hostfile must resolve (a quick check before any ssh)."""
    for h in hosts:
        if is_local_address(h.name):
            continue
        try:
            socket.gethostbyname(h.name)
        except OSError as exc:
            raise LaunchError(f"host {h.name!r} from the hostfile does not resolve ({exc}); fix the name "
                              "or add it to /etc/hosts") from None


PROBE_MARK = "GRAPE_DS_PROBE "


def _probe_command(python: str, cwd: str) -> str:
    q = shlex.quote
    return (f"cd {q(cwd)} 2>/dev/null || {{ echo '{PROBE_MARK}missing-checkout'; exit 0; }}; "
            f"test -x {q(python)} || {{ echo '{PROBE_MARK}missing-python'; exit 0; }}; "
            f"exec {q(python)} -m grape_ds.hostprobe")


def _probe_one(host: str, python: str, cwd: str, timeout: float) -> dict:
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host, _probe_command(python, cwd)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"host {host!r} did not answer over ssh within {timeout:g} s"}
    except FileNotFoundError:
        return {"error": "there is no ssh client on this host (the deepspeed launcher starts remote ranks "
                         "with pdsh over ssh)"}
    marks = [line[len(PROBE_MARK):] for line in out.stdout.splitlines() if line.startswith(PROBE_MARK)]
    if out.returncode == 255 and not marks:
        why = (out.stderr.strip().splitlines() or ["ssh exited with 255"])[-1]
        return {"error": f"host {host!r} is not reachable over ssh ({why}); the deepspeed launcher starts "
                         f"every rank with pdsh over passwordless ssh: `ssh {host} true` must work from "
                         "this host without a password"}
    if marks == ["missing-checkout"]:
        return {"error": f"host {host!r} has no folder {cwd}: the launcher runs `cd {cwd}` there; put the "
                         "same checkout at the same path on every host (a shared file system, or a copy)"}
    if marks == ["missing-python"]:
        return {"error": f"host {host!r} has no Python at {python}: the launcher runs the same interpreter "
                         "path there; create the same virtual environment at that path on every host"}
    if not marks:
        tail = " | ".join((out.stderr.strip() or out.stdout.strip()).splitlines()[-3:])
        return {"error": f"host {host!r}: `{python} -m grape_ds.hostprobe` in {cwd} failed (exit "
                         f"{out.returncode}: {tail})"}
    return json.loads(marks[-1])


def probe_hosts(hosts: list[Host], python: str | None = None, cwd: str | None = None,
                timeout: float = 60.0) -> dict[str, dict]:
    """Ask every host, over ssh as pdsh will, what it offers (:mod:`grape_ds.hostprobe`), in parallel.

    ``python`` and ``cwd`` default to what the deepspeed launcher runs on each host: this interpreter
    (``sys.executable``) in this folder. Returns ``{host: probe}``, where a host that cannot run the
    probe gets ``{"error": message}`` (unreachable over ssh, no checkout or no Python at that path).
    """
    from concurrent.futures import ThreadPoolExecutor
    python, cwd = python or sys.executable, cwd or os.path.abspath(".")
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        found = pool.map(lambda h: _probe_one(h.name, python, cwd, timeout), hosts)
    return {h.name: info for h, info in zip(hosts, found)}


def _is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr == "::1"


def _routable(interfaces: dict[str, list[str]]) -> str:
    found = [f"{name} ({', '.join(a)})" for name, a in interfaces.items()
             if a and not all(_is_loopback(x) for x in a)]
    return ", ".join(found) if found else "none with an address other than loopback"


def check_hosts(hosts: list[Host], infos: dict[str, dict], master: str, ifname: str, gloo: bool) -> None:
    """The traps of a multi-host launch, from each host's probe, all reported at once.

    * a host that cannot run the rank: unreachable over ssh, no checkout or Python at the same path,
      other grape-ds sources than this host's, no deepspeed;
    * only when some host is another machine: ``master`` resolving to a loopback address (the other
      hosts cannot reach it); without a socket interface and with gloo (``gloo``), a host whose name
      resolves to loopback only (gloo advertises that address and the job dies after minutes in
      ``Gloo connectFullMesh failed``); with ``ifname`` (comma-separated), a host lacking it.

    Raises:
        LaunchError: one line per problem, each naming the host and what to set.
    """
    from grape_ds.hostprobe import interfaces, source_digest
    problems, here = [], source_digest()
    for h in hosts:
        info = infos[h.name]
        if "error" in info:
            problems.append(info["error"])
        elif info["sources"] != here:
            problems.append(f"host {h.name!r} runs other grape-ds sources in {os.path.abspath('.')} (digest "
                            f"{info['sources']}, here {here}): sync the checkout on every host")
        elif not info["deepspeed"]:
            problems.append(f"host {h.name!r}: deepspeed is not installed for {info['python']}")
    if problems:
        raise LaunchError("pre-flight of the hosts failed:\n  " + "\n  ".join(problems))
    if all(is_local_address(h.name) for h in hosts):
        return  # one machine under several names: loopback reaches every rank
    names = ", ".join(h.name for h in hosts)
    try:
        master_ip = socket.gethostbyname(master)
    except OSError as exc:
        raise LaunchError(f"the master address {master!r} does not resolve ({exc})") from None
    if _is_loopback(master_ip):
        problems.append(f"the master address {master} is {master_ip}, a loopback address, but the launch spans "
                        f"hosts ({names}): the other hosts cannot reach it. Set MASTER_ADDR to this host's "
                        f"address on the network the hosts share; here: {_routable(interfaces())}")
    wanted = [n for n in ifname.split(",") if n]
    for h in hosts:
        info = infos[h.name]
        if wanted:
            missing = [n for n in wanted if not info["interfaces"].get(n)]
            if missing:
                problems.append(f"host {h.name!r} has no interface {', '.join(missing)} with an IPv4 address "
                                f"(SOCKET_IFNAME={ifname}); its interfaces: {_routable(info['interfaces'])}")
        elif gloo and all(_is_loopback(a) for a in info["host_addrs"]):
            problems.append(
                f"on host {h.name!r} the host name {info['host']!r} resolves to "
                f"{', '.join(info['host_addrs']) or 'nothing'}: gloo advertises that address to the other "
                "ranks, and the job dies after minutes with 'Gloo connectFullMesh failed ... "
                "remote=[127.0.0.1]'. Set SOCKET_IFNAME to the interface of the network the hosts share "
                f"(it becomes GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME on every host); on {h.name}: "
                f"{_routable(info['interfaces'])}")
    if problems:
        raise LaunchError("pre-flight of the hosts failed:\n  " + "\n  ".join(problems))


# What the ranks on other hosts need from this environment. The deepspeed launcher itself forwards
# only PYTHON*, MLFLOW*, MV2*, UCX* and its accelerator's variables (deepspeed/launcher/runner.py,
# EXPORT_ENVS); the rest must travel in a .deepspeed_env file (``NAME=value`` lines).
FORWARD_VARS = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "TORCH_EXTENSIONS_DIR",
                "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
FORWARD_PREFIXES = ("GRAPE_DS_", "HF_", "TRANSFORMERS_", "NCCL_", "GLOO_", "TORCH_DISTRIBUTED_")


def deepspeed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The ``.deepspeed_env`` that remote hosts need: the user's own files first (``~/.deepspeed_env``
    and ``./.deepspeed_env``, or ``$DS_ENV_FILE``: the launcher reads only the file we name), then
    :data:`FORWARD_VARS` and :data:`FORWARD_PREFIXES` from ``env``.

    Raises:
        LaunchError: a line of the user's file the launcher would choke on (``path:line``), or a value
            it would mangle (it pastes values into a shell command inside double quotes).
    """
    env = dict(os.environ if env is None else env)
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    out: dict[str, str] = {}
    for folder in (os.path.expanduser("~"), "."):  # the launcher's own order
        path = Path(folder, name)
        if not path.is_file():
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if "=" not in line:
                raise LaunchError(f"{path}:{lineno}: {line!r} is not NAME=value (the deepspeed launcher "
                                  "stops on it)")
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    for key in sorted(env):
        if key in FORWARD_VARS or key.startswith(FORWARD_PREFIXES):
            out[key] = env[key]
    for key, value in out.items():
        if any(c in value for c in '"$`\\\n'):
            raise LaunchError(f"environment variable {key}={value!r} cannot reach the other hosts as it is (the "
                              "deepspeed launcher pastes it into a shell command): drop the quotes, $, ` or \\")
    return out


def socket_ifname_env(ifname: str) -> dict[str, str]:
    """``SOCKET_IFNAME`` as the variables gloo and NCCL read."""
    return {"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": ifname} if ifname else {}


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
    path = RunPaths(run_dir).status
    return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

TRAIN_MODULE = "grape_ds.train"


def train_command(config: str | os.PathLike, sets: Sequence[str] = (), args: Sequence[str] = (), *,
                  launcher: Sequence[str] | None = None, python: str = sys.executable) -> list[str]:
    """The one command line that trains ``config`` (with ``--set`` overrides ``sets`` and further
    ``grape_ds.train`` arguments ``args``: ``--no-resume``, ``--stop-at N``, ``--local_rank=R``):
    under a ``launcher`` (the DeepSpeed runner's argv, which then gets ``--module grape_ds.train``),
    or, without one, one rank as ``python -u -m grape_ds.train`` (what SLURM's srun and DeepSpeed's
    per-node launcher start). Used by ``grape-ds launch``, ``grape-ds bench`` and the tests."""
    train = ["--config", str(config), *itertools.chain.from_iterable(("--set", s) for s in sets), *args]
    if launcher is not None:
        return [*launcher, "--module", TRAIN_MODULE, *train]
    return [python, "-u", "-m", TRAIN_MODULE, *train]


def deepspeed_command(hostfile: Path, hosts: list[Host], master_addr: str, master_port: int,
                      config: str, sets: list[str]) -> list[str]:
    cmd = [_deepspeed_bin(), "--hostfile", str(hostfile), "--master_addr", master_addr,
           "--master_port", str(master_port)]
    if len(hosts) == 1:
        # one host: the launcher starts the ranks itself, no ssh (and no ssh check against it)
        cmd.append("--no_ssh_check")
    return train_command(config, sets, launcher=cmd)


def _deepspeed_bin() -> str:
    local = Path(sys.executable).parent / "deepspeed"
    return str(local) if local.exists() else "deepspeed"


def _print_plan(title: str, hostfile: str | None, commands: list[list[str]], env: dict[str, str],
                remote_env: dict[str, str] | None = None) -> None:
    print(f"# {title}")
    if hostfile is not None:
        print("# hostfile:")
        print(hostfile, end="")
    if env:
        print("# environment:")
        for k, v in env.items():
            print(f"export {k}={shlex.quote(v)}")
    if remote_env is not None:
        print(f"# environment of the ranks on every host ({env['DS_ENV_FILE']}):")
        for k, v in remote_env.items():
            print(f"{k}={v}")
    print("# commands:")
    for c in commands:
        print(shlex.join(c))
    sys.stdout.flush()


def _run_dir(config: str, sets: list[str], world_size: int) -> Path:
    from grape_ds.config import load_config
    return load_config(config, sets, world_size=world_size).run_dir


def _uses_gloo() -> bool:
    """Whether the ranks will talk over gloo (DeepSpeed's CPU accelerator) rather than NCCL."""
    acc = os.environ.get("DS_ACCELERATOR")
    if acc:
        return acc == "cpu"
    import torch
    return not torch.cuda.is_available()


def _multi_host_env(hosts: list[Host], env: dict[str, str], run_dir: Path) -> dict[str, str] | None:
    """Several hosts: the launcher goes through pdsh, and the ranks' environment travels in a
    ``.deepspeed_env`` under ``<run>/launch`` (``DS_ENV_FILE`` added to ``env``). None for one host."""
    if len(hosts) < 2:
        return None
    remote = deepspeed_env({**os.environ, **env})
    env["DS_ENV_FILE"] = str(RunPaths(run_dir).launch / "deepspeed_env")
    return remote


def _preflight_hosts(hosts: list[Host], master: str, env: dict[str, str],
                     remote_env: dict[str, str] | None) -> None:
    """Before anything starts: the names resolve, and on a multi-host launch every host can run its
    ranks (:func:`probe_hosts`, :func:`check_hosts`); then the ranks' environment file is written."""
    check_hosts_reachable(hosts)
    if remote_env is None:
        return
    ifname = remote_env.get("GLOO_SOCKET_IFNAME") or remote_env.get("NCCL_SOCKET_IFNAME") or ""
    check_hosts(hosts, probe_hosts(hosts), master, ifname, _uses_gloo())
    path = Path(env["DS_ENV_FILE"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in remote_env.items()))


def launch_hostfile(args: argparse.Namespace) -> int:
    hosts = read_hostfile(args.hostfile)
    if args.ranks_per_node:
        hosts = [Host(h.name, args.ranks_per_node) for h in hosts]
    world = sum(h.slots for h in hosts)
    spans = not all(is_local_address(h.name) for h in hosts)
    # one machine: loopback; several: the first host as written (pre-flight refuses a loopback one)
    master = args.master_addr or (hosts[0].name if spans or not is_local_address(hosts[0].name)
                                  else "127.0.0.1")
    check_config(args.config, args.sets, world)
    run_dir = _run_dir(args.config, args.sets, world)
    hostfile = Path(args.hostfile)
    if args.ranks_per_node:  # the launcher reads slots from the file: write the one we mean
        hostfile = RunPaths(run_dir).launch / "hostfile"
    cmd = deepspeed_command(hostfile, hosts, master, args.master_port, args.config, args.sets)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **socket_ifname_env(args.socket_ifname)}
    remote_env = _multi_host_env(hosts, env, run_dir)
    _print_plan(f"{len(hosts)} host(s), {world} rank(s), master {master}:{args.master_port}",
                hostfile_text(hosts), [cmd], env, remote_env)
    if args.dry_run:
        return 0
    _preflight_hosts(hosts, master, env, remote_env)
    check_port_free(master, args.master_port, "set MASTER_PORT to a free port")
    if args.ranks_per_node:
        hostfile.parent.mkdir(parents=True, exist_ok=True)
        hostfile.write_text(hostfile_text(hosts))
    os.environ.update(env)
    return run_owning_ranks(cmd, hosts, run_dir)


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


def _ranks_by_host(hosts: list[Host], run_dir: Path, since: float) -> dict[str, list[int]]:
    """``{host: [pid, ...]}`` of this launch's ranks, from ``<run>/ranks.json`` (written by rank 0 once
    every rank is up; one from an earlier launch, older than ``since``, is ignored). DeepSpeed gives
    ranks to hosts in hostfile order, ``slots`` each (``deepspeed/launcher/runner.py``, world_info)."""
    path = RunPaths(run_dir).ranks
    try:
        if path.stat().st_mtime < since:
            return {}
        places = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    owner = [h.name for h in hosts for _ in range(h.slots)]
    out: dict[str, list[int]] = {}
    for p in places:
        if p["rank"] < len(owner):
            out.setdefault(owner[p["rank"]], []).append(int(p["pid"]))
    return out


def _signal_over_ssh(by_host: dict[str, list[int]], signum: int = signal.SIGTERM) -> None:
    """Send ``signum`` to grape-ds ranks on their hosts over ssh (only to processes whose command line
    names grape_ds.train, so a reused pid is left alone), all hosts at once."""
    from concurrent.futures import ThreadPoolExecutor

    def one(host: str, pids: list[int]) -> None:
        script = "; ".join(f"grep -q grape_ds.train /proc/{p}/cmdline 2>/dev/null && kill -{int(signum)} {p}"
                           for p in pids) + "; true"
        try:
            subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host, script],
                           capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"[grape-ds] could not signal the ranks on {host}: {exc}", file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max_workers=min(32, len(by_host) or 1)) as pool:
        list(pool.map(lambda item: one(*item), by_host.items()))


def run_owning_ranks(cmd: list[str], hosts: list[Host] | None = None, run_dir: Path | None = None) -> int:
    """Run a launcher command (``deepspeed ...``) as a child in its own session and return its exit
    status. The first SIGTERM, SIGINT or SIGUSR1 this process receives is passed as SIGTERM to every
    grape-ds rank (each saves a checkpoint at its next step boundary and exits 0, so the launcher exits
    0); a second one kills the launcher's tree (SIGKILL).

    One host: the ranks are this process's descendants. Several ``hosts`` (pdsh starts the ranks under
    each host's sshd, out of reach of this process tree): the ranks listed in ``<run_dir>/ranks.json``
    get the signal over ssh, on every host, the first one included."""
    import time

    import psutil
    started = time.time()
    proc = subprocess.Popen(cmd, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) > 1:
            print("[grape-ds] second signal: killing the job", file=sys.stderr, flush=True)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        if hosts is not None and len(hosts) > 1 and run_dir is not None:
            by_host = _ranks_by_host(hosts, run_dir, started)
            if by_host:
                print(f"[grape-ds] {name}: asking {sum(map(len, by_host.values()))} rank(s) on "
                      f"{len(by_host)} host(s) to save a checkpoint and stop (signal again to kill the "
                      "launcher)", file=sys.stderr, flush=True)
                _signal_over_ssh(by_host)
                return
            print(f"[grape-ds] {name}: the ranks are not all up yet (no ranks.json): stopping the "
                  "launcher, which ends them on every host", file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGTERM)
            return
        ranks = _local_ranks(proc.pid)
        print(f"[grape-ds] {name}: asking {len(ranks)} rank(s) to save a checkpoint and stop (signal "
              "again to kill them at once)", file=sys.stderr, flush=True)
        for p in ranks:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    return proc.wait()


def run_forwarding(cmd: list[str]) -> int:
    """Run ``cmd`` (``srun ...``) and pass every SIGTERM or SIGUSR1 this process gets on to it (srun
    passes them to every task); SIGINT becomes SIGTERM (srun reads a single SIGINT as "print status").
    The batch scripts ask SLURM to signal the batch shell (``--signal=B:...``), which is this process."""
    proc = subprocess.Popen(cmd)

    def forward(signum, frame) -> None:
        print(f"[grape-ds] {signal.Signals(signum).name}: passing it to the ranks", file=sys.stderr, flush=True)
        proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    return proc.wait()


def slurm_master_port(job_id: int) -> int:
    """A port derived from the job id, so concurrent jobs on shared nodes do not collide."""
    return 20000 + job_id % 10000


# what each SLURM variable the launch reads needs on the sbatch line when a job lacks it
SBATCH_OPTION = {"SLURM_JOB_NODELIST": "--nodes=N", "SLURM_JOB_ID": "(set by SLURM itself)"}


def _slurm_env(name: str, override: str | int | None, env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    value = override if override is not None else env.get(name)
    if value is None:
        if "SLURM_JOB_ID" in env:  # inside an allocation that lacks it: say what to add
            raise LaunchError(f"SLURM job {env['SLURM_JOB_ID']} does not set ${name}: submit with "
                              f"{SBATCH_OPTION.get(name, '')} on the sbatch line or in #SBATCH")
        raise LaunchError(f"${name} is not set: run inside a SLURM allocation (sbatch/salloc), or pass "
                          "--nodelist/--ntasks-per-node/--job-id with --dry-run to see the plan")
    return str(value)


def _expand_tasks_per_node(text: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` (``2(x3),1``) -> ``[2, 2, 2, 1]``."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot read SLURM_TASKS_PER_NODE={text!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_tasks_per_node(override: str | None = None, env: dict[str, str] | None = None) -> int:
    """Ranks per node of this allocation: ``--ntasks-per-node``, else ``$SLURM_NTASKS_PER_NODE`` (set
    only when sbatch got ``--ntasks-per-node``), else derived from ``$SLURM_TASKS_PER_NODE`` (always
    set; ``1(x2)`` for ``--nodes=2 --ntasks=2``).

    Raises:
        LaunchError: uneven tasks per node (grape-ds runs as many ranks on every node), or none of
            the variables set; the message names the sbatch option to add.
    """
    env = os.environ if env is None else env
    value = override or env.get("SLURM_NTASKS_PER_NODE")
    if value:
        return int(str(value).split("(")[0])
    job = env.get("SLURM_JOB_ID")
    if job is None:
        _slurm_env("SLURM_NTASKS_PER_NODE", None, env)
    tasks = env.get("SLURM_TASKS_PER_NODE")
    if not tasks:
        raise LaunchError(f"SLURM job {job} sets neither $SLURM_NTASKS_PER_NODE nor $SLURM_TASKS_PER_NODE: "
                          "submit with --ntasks-per-node=N")
    counts = _expand_tasks_per_node(tasks)
    if len(set(counts)) != 1:
        raise LaunchError(f"SLURM job {job} has uneven tasks per node (SLURM_TASKS_PER_NODE={tasks}); "
                          "grape-ds runs the same number of ranks on every node: submit with "
                          "--ntasks-per-node=N (and --nodes=M) instead of --ntasks")
    return counts[0]


def launch_slurm(args: argparse.Namespace) -> int:
    nodelist = _slurm_env("SLURM_JOB_NODELIST", args.nodelist)
    per_node = slurm_tasks_per_node(args.ntasks_per_node)
    job_id = int(_slurm_env("SLURM_JOB_ID", args.job_id))
    hosts = [Host(h, per_node) for h in (expand_nodelist(nodelist) if args.dry_run and args.nodelist
                                          else slurm_hostnames(nodelist))]
    world = len(hosts) * per_node
    master, port = hosts[0].name, args.master_port or slurm_master_port(job_id)
    check_config(args.config, args.sets, world)
    run_dir = _run_dir(args.config, args.sets, world)
    logs = RunPaths(run_dir).slurm
    env = {"MASTER_ADDR": master, "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **socket_ifname_env(args.socket_ifname)}
    remote_env = None
    if args.mode == "srun":
        # one task per rank; each task's rank comes from SLURM's own variables
        rank_env = "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS"
        train = shlex.join(train_command(args.config, args.sets))
        cmd = ["srun", "--kill-on-bad-exit=1", f"--nodes={len(hosts)}", f"--ntasks-per-node={per_node}",
               "--open-mode=append",  # a requeued job keeps the earlier attempts' logs
               f"--output={logs}/job%j-rank%t.log", "bash", "-c", f"export {rank_env}; exec {train}"]
        hostfile = None
    else:
        hostfile_path = logs / f"hostfile.{job_id}"
        hostfile = hostfile_text(hosts)
        cmd = deepspeed_command(hostfile_path, hosts, master, port, args.config, args.sets)
        remote_env = _multi_host_env(hosts, env, run_dir)
    _print_plan(f"SLURM job {job_id}: {len(hosts)} node(s) x {per_node} rank(s) = {world}, "
                f"master {master}:{port}, mode {args.mode}, logs in {logs}", hostfile, [cmd], env, remote_env)
    if args.dry_run:
        return 0
    if args.mode == "deepspeed":
        _preflight_hosts(hosts, master, env, remote_env)
    check_port_free(master, port, "pass --master-port, or resubmit (the port follows the job id)")
    logs.mkdir(parents=True, exist_ok=True)
    if hostfile is not None:
        (logs / f"hostfile.{job_id}").write_text(hostfile)
    os.environ.update(env)
    # SLURM's signals reach this process, the batch shell (--signal=B:..., scancel --batch): srun passes
    # them to its tasks, run_owning_ranks to the deepspeed launcher's ranks on every host
    rc = run_forwarding(cmd) if args.mode == "srun" else run_owning_ranks(cmd, hosts, run_dir)
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
        q.add_argument("--socket-ifname", default=os.environ.get("SOCKET_IFNAME", ""), metavar="IFACE",
                       help="network interface the ranks talk over, as GLOO_SOCKET_IFNAME and "
                            "NCCL_SOCKET_IFNAME on every host (default: $SOCKET_IFNAME)")
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
