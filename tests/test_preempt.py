"""Preemption: SIGUSR1 (or SIGTERM) to the job saves a complete checkpoint at the next step boundary,
on all ranks at the same step, and the same command resumes to the uninterrupted run's parameters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import DEMO, REPO, TINY, free_port, launch
from grape_ds.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow

SETS = ["train.max_steps=30", "checkpoint.every=0", "eval.every=0", "mixture.every=10",
        "logging.trace_batches=false"]


def _steps_done(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def _params(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = run / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=complete_checkpoints(ckpt)[-1][1])


def test_signal_saves_at_a_step_boundary_and_resume_is_exact(tmp_path, data_cache):
    sig = signal.SIGUSR1  # SIGTERM, the same path, is tested under SLURM (tests/test_slurm.py)
    overrides = [*TINY, *SETS, f"logging.output_dir={tmp_path}", f"data.cache_dir={data_cache}",
                 "logging.run_name=pre"]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_port()), "--module", "grape_ds.train", "--config", str(DEMO)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    run = tmp_path / "pre"
    deadline = time.time() + 240
    while _steps_done(run) < 8:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, sig)  # like a scheduler signalling every process of the job
    out = proc.communicate(timeout=120)[0]
    ckpts = complete_checkpoints(run / "checkpoints")
    assert len(ckpts) == 1, out[-3000:]
    stopped = ckpts[0][0]
    assert 8 <= stopped < 30 and "stop requested" in out
    assert _steps_done(run) == stopped  # both ranks stopped at the same boundary, nothing after it

    launch(tmp_path, data_cache, [*SETS, "logging.run_name=pre"])  # the same command resumes
    launch(tmp_path, data_cache, [*SETS, "logging.run_name=full"])
    a, b = _params(run), _params(tmp_path / "full")
    assert all(torch.equal(a[n], b[n]) for n in a)
    full = json.loads((tmp_path / "full" / "mixture.json").read_text())
    assert json.loads((run / "mixture.json").read_text())["history"] == full["history"]
