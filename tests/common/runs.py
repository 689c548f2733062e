"""Running real ranks of ``grape_ds.train`` from the tests: the repository paths, the tiny demo config
(``TINY``), :func:`launch`/:func:`run_ranks` (separate processes on gloo, as the ``deepspeed`` launcher
starts them on one host), the reference run's settings and :func:`final_params`.

The environment these need (``DS_ACCELERATOR=cpu``, ``GRAPE_DS_CHECK_DEVICES=1``, ...) is set by
``tests/conftest.py`` before any test module is imported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from grape_ds.distributed import free_port  # noqa: F401  (tests import it from here)
from grape_ds.launch import train_command

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "yaml_configs" / "demo.yaml"


# A tiny, fast run on the planted corpus; tests add their own overrides on top.
TINY = [
    "train.max_steps=40", "train.warmup_steps=4", "train.micro_batch_size=4",
    "train.gradient_accumulation_steps=2", "eval.every=20", "eval.max_windows=32",
    "checkpoint.every=20", "logging.every=5", "logging.progress=false",
]


def launch(run_root: Path, cache: Path, overrides=(), args=(), world_size: int = 2,
           timeout: float = 300, check: bool = True, config: Path = DEMO,
           strict_devices: bool = False) -> subprocess.CompletedProcess:
    """Run ``grape_ds.train`` with ``world_size`` real ranks on this host. The demo config is shrunk with
    ``TINY``; another config runs with its own values.

    The ranks are started as DeepSpeed's per-node launcher (``deepspeed.launcher.launch``) starts them:
    ``python -u -m grape_ds.train --local_rank=R`` with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT`` set, their output interleaved, and the first rank that fails ends
    the others (SIGTERM, then SIGKILL 30 s later) and gives the exit status. Going without the
    launcher's two processes saves about 5 s per run; the launcher itself is run by the tests of the
    launch scripts (tests/test_launch.py, test_safe_runs_launch.py, test_multinode.py, test_slurm.py).
    Returns a ``CompletedProcess`` whose ``stdout`` holds every rank's output (``stderr`` is empty).
    """
    tiny = TINY if Path(config) == DEMO else []
    sets = [*tiny, f"logging.output_dir={run_root}", f"data.cache_dir={cache}", *overrides]
    env = {**os.environ, **({"GRAPE_DS_CHECK_DEVICES": "strict"} if strict_devices else {})}
    proc = run_ranks(config, sets, args, world_size, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed with exit code {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def run_ranks(config, sets, args, world_size: int, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``world_size`` processes of ``python -u -m grape_ds.train --local_rank=R --config config --set ...
    args`` (``grape_ds.launch.train_command``) as one job on this host (see :func:`launch`). Raises ``subprocess.TimeoutExpired`` (after killing them) past ``timeout``."""
    import threading
    port, (read_fd, write_fd) = free_port(), os.pipe()
    procs = []
    for rank in range(world_size):
        rank_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                    "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_SIZE": str(world_size),
                    "CROSS_RANK": "0", "CROSS_SIZE": "1"}
        cmd = train_command(config, sets, [f"--local_rank={rank}", *args])
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=rank_env, stdout=write_fd, stderr=write_fd,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
    os.close(write_fd)
    chunks: list[bytes] = []

    def read() -> None:
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline, failed, ended_at = time.monotonic() + timeout, None, None

    def signal_all(sig) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            signal_all(signal.SIGKILL)
            for p in procs:
                p.wait()
            reader.join(5)
            raise subprocess.TimeoutExpired(procs[0].args, timeout, output=b"".join(chunks).decode(errors="replace"))
        if failed is None:
            failed = next((p for p in procs if p.poll() not in (None, 0)), None)
            if failed is not None:  # as deepspeed.launcher.launch does: end the others
                signal_all(signal.SIGTERM)
                ended_at = time.monotonic()
        elif time.monotonic() - ended_at > 30:
            signal_all(signal.SIGKILL)
        time.sleep(0.05)
    reader.join(10)
    os.close(read_fd)
    failed = failed or next((p for p in procs if p.returncode != 0), None)  # all ended before a poll saw one
    code = failed.returncode if failed is not None else 0
    return subprocess.CompletedProcess(procs[0].args, code if code >= 0 else 128 - code,
                                       stdout=b"".join(chunks).decode(errors="replace"), stderr="")


# The uninterrupted 2-rank run that stopped, resumed, moved and multi-host runs of the same config are
# compared with (tests/test_preempt.py, test_slurm.py, test_multinode.py): TINY plus these.
REFERENCE_SETS = ["train.max_steps=30", "checkpoint.every=0", "eval.every=0", "mixture.every=10",
                  "logging.trace_batches=false"]


def final_params(run: Path) -> dict:
    """The fp32 parameters of a run's newest complete checkpoint (merged from its ZeRO shards)."""
    from grape_ds.checkpoint import complete_checkpoints, consolidated_state_dict
    from grape_ds.rundir import RunPaths

    ckpt = RunPaths(run).checkpoints
    return consolidated_state_dict(ckpt, complete_checkpoints(ckpt)[-1][1])
