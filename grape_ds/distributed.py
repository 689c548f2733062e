"""Rank queries, process-group helpers and rank-aware logging.

``get_rank()`` / ``get_world_size()`` fall back to the launcher's environment variables and then to
0 / 1, so every component runs in plain pytest without a process group. Logging is set up once per
process: every record is stamped with its rank, and ranks other than 0 only show warnings.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

__all__ = ["get_rank", "get_world_size", "get_local_rank", "is_main", "setup_logging", "barrier",
           "broadcast_object", "all_reduce_sum"]


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


def setup_logging(level: int = logging.INFO) -> None:
    """One handler on stderr, records stamped ``[rank N]``; INFO only from rank 0."""
    root = logging.getLogger("grape_ds")
    if any(getattr(h, "_grape_ds", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
