"""Rank queries, process-group helpers and rank-aware logging.

``get_rank()`` / ``get_world_size()`` fall back to the launcher's environment variables and then to
0 / 1, so every component runs in plain pytest without a process group. Logging is set up once per
process: every record is stamped with its rank, and ranks other than 0 only show warnings.

Every collective of the package goes through the helpers here, and each checks that its tensor lives
on this process's device (:func:`grape_ds.devices.check_collective`): NCCL takes only CUDA tensors.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys

import torch
import torch.distributed as dist

from grape_ds.devices import check_collective

__all__ = ["LaunchError", "free_port", "is_local_address", "port_in_use", "check_port_free", "adopt_slurm_env", "get_rank", "get_world_size", "get_local_rank", "is_main", "setup_logging", "barrier", "is_collective_failure", "rank_places", "lost_peers",
           "broadcast_object", "all_reduce_sum"]


LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


class LaunchError(RuntimeError):
    """A launch that cannot work as given; the message names the host, port or file and the fix."""


def is_local_address(addr: str) -> bool:
    """Whether ``addr`` names this machine (loopback, its host name, or one of its addresses)."""
    if addr in LOCAL_NAMES or addr in {socket.gethostname(), socket.gethostname().split(".")[0]}:
        return True
    try:
        ip = socket.gethostbyname(addr)
    except OSError:
        return False
    if ip.startswith("127."):
        return True
    from grape_ds.hostprobe import interfaces  # every address of this host (a network namespace's too)
    return any(ip in addrs for addrs in interfaces().values())


def free_port() -> int:
    """A TCP port free on this machine right now (for a single-process group, a bench or a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(addr: str, port: int) -> bool:
    """Whether ``port`` is taken on this machine (``addr`` local) or answers on a remote ``addr``."""
    if is_local_address(addr):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # like the store that will listen there: connections of an earlier run lingering in
            # TIME_WAIT do not count, a socket listening on the port does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError:
                return True
        return False
    try:
        with socket.create_connection((addr, port), timeout=3):
            return True
    except OSError:
        return False


def check_port_free(addr: str, port: int, how_to_change: str) -> None:
    if not 0 < port < 65536:
        raise LaunchError(f"master port {port} is not a TCP port (1-65535)")
    if port_in_use(addr, port):
        raise LaunchError(f"master port {port} on {addr} is already in use (another job, or a previous run "
                          f"that is still alive); {how_to_change}")


def adopt_slurm_env() -> None:
    """Under ``srun`` with one task per rank and no launcher, take ``RANK``, ``LOCAL_RANK`` and
    ``WORLD_SIZE`` from SLURM's ``SLURM_PROCID``, ``SLURM_LOCALID`` and ``SLURM_NTASKS``. Variables a
    launcher already set win."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_STEP_ID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")


def get_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return get_rank() == 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = get_rank()
        return record.levelno >= logging.WARNING or record.rank == 0


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is when a record is written (not the one there was
    when the handler was made), so redirecting stderr later never leaves it writing to a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """One handler on stderr, records stamped ``[rank N]``; INFO only from rank 0."""
    root = logging.getLogger("grape_ds")
    if any(getattr(h, "_grape_ds", False) for h in root.handlers):
        return
    handler = _StderrHandler()
    handler._grape_ds = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _rank_address() -> str:
    """The address this rank talks from: its socket interface's (``GLOO_SOCKET_IFNAME``), else the one
    the route to ``MASTER_ADDR`` leaves from (a UDP connect sends nothing), else loopback."""
    ifname = (os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME") or "").split(",")[0]
    if ifname:
        from grape_ds.hostprobe import interfaces
        addrs = interfaces().get(ifname)
        if addrs:
            return addrs[0]
    master = os.environ.get("MASTER_ADDR")
    if master:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
                return s.getsockname()[0]
        except OSError:
            pass
    return "127.0.0.1"


def rank_places() -> list[dict]:
    """Where every rank runs, gathered from all ranks (a collective): one ``{"rank", "host",
    "address", "pid", "local_rank", "slurm_node"}`` per rank, in rank order. ``address`` tells hosts
    apart where their names do not (containers, network namespaces); ``slurm_node`` is the SLURM node
    of an srun task (None elsewhere)."""
    me = {"rank": get_rank(), "host": socket.gethostname(), "address": _rank_address(), "pid": os.getpid(),
          "local_rank": get_local_rank(), "slurm_node": os.environ.get("SLURMD_NODENAME")}
    if not (dist.is_available() and dist.is_initialized()):
        return [me]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, me)
    return out


def lost_peers(exc: BaseException, places: list[dict], rank: int) -> str:
    """The other ranks a collective failure points at, for the message: those at the peer address
    gloo names (``Connection closed by peer [10.0.0.2]:port``), else all other ranks; each as
    ``rank R on HOST (ADDRESS, pid P)``."""
    others = [p for p in places if p["rank"] != rank]
    named = {a for a in re.findall(r"\[([0-9a-fA-F.:]+)\]:\d+", str(exc))}
    hit = [p for p in others if p["address"] in named] or others
    return ", ".join(f"rank {p['rank']} on {p['host']} ({p['address']}, pid {p['pid']})" for p in hit)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group).

    Raises:
        RuntimeError: ``t`` is not on this process's device (:mod:`grape_ds.devices`), with or
            without a process group, so a CPU test catches what NCCL would refuse.
    """
    check_collective(t, "all_reduce")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the process group: a peer died, or a collective outlived the timeout."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout"))
