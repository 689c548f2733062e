"""``run_distributed(fn, world_size=2)``: real processes on gloo, for tests of collectives.

Each rank is a spawned process with ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE`` set;
it initialises a gloo process group, runs the module-level ``fn(rank, world_size, *args)`` and always
destroys the group. Results come back per rank. A rank that dies or outlives ``timeout`` fails the
test with its rank and exit code.
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import traceback

import torch

from grape_ds.distributed import free_port

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            # Results travel as bytes: a tensor sent as-is is shared memory that vanishes when this
            # process exits, possibly before the parent has read it.
            buf = io.BytesIO()
            torch.save(fn(rank, world_size, *args), buf)
            queue.put((rank, "ok", buf.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 120.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank} raised:\n{value}")
    except queue_mod.Empty:
        errors.append(f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(results))}")
    for r, p in enumerate(procs):
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            errors.append(f"rank {r} did not exit")
        elif p.exitcode not in (0, None) and r not in results:
            errors.append(f"rank {r} exited with code {p.exitcode}")
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
