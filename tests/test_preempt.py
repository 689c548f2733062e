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


@pytest.fixture(scope="module")
def full(tmp_path_factory, data_cache) -> Path:
    """The uninterrupted run the interrupted ones are compared with."""
    root = tmp_path_factory.mktemp("preempt")
    launch(root, data_cache, [*SETS, "logging.run_name=full"])
    return root / "full"


def test_signal_saves_at_a_step_boundary_and_resume_is_exact(tmp_path, data_cache, full):
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
    a, b = _params(run), _params(full)
    assert all(torch.equal(a[n], b[n]) for n in a)
    history = json.loads((full / "mixture.json").read_text())["history"]
    assert json.loads((run / "mixture.json").read_text())["history"] == history


def _eval_loss(run: Path) -> float:
    return json.loads((run / "eval" / "eval.jsonl").read_text().splitlines()[-1])["domain_loss_avg"]


def test_resume_on_one_rank_and_back_on_two_keeps_the_step_the_weights_and_the_global_batch(tmp_path, data_cache,
                                                                                          full):
    """2 ranks to step 10 (a round boundary), then 1 rank (accumulating twice as many micro-batches, so
    the global batch stays 16 sequences) to step 20, then 2 ranks again to 30, through DeepSpeed's
    universal checkpoint: the step, the LR schedule, the controller's weights and history carry over,
    and the final loss is close to the uninterrupted run's (the data stream cannot be the same)."""
    sets = [*SETS, "logging.run_name=moved"]
    launch(tmp_path, data_cache, sets, args=["--stop-at", "10"])
    one = launch(tmp_path, data_cache, [*sets, "train.gradient_accumulation_steps=4"], world_size=1,
                 args=["--stop-at", "20"])
    said = one.stdout + one.stderr
    assert "of 2 ranks on 1 ranks (DeepSpeed universal checkpoint)" in said, said[-3000:]
    assert "world size: 2 ranks -> 1 ranks (the checkpoint is converted" in said
    launch(tmp_path, data_cache, sets)  # back on 2 ranks, from the 1-rank checkpoint of step 20
    run = tmp_path / "moved"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert complete_checkpoints(run / "checkpoints")[-1][0] == 30
    assert not (run / "checkpoints" / "universal").exists()
    moved_history = json.loads((run / "mixture.json").read_text())["history"]
    history = json.loads((full / "mixture.json").read_text())["history"]
    assert [h["step"] for h in moved_history] == [h["step"] for h in history]
    assert moved_history[:2] == history[:2]  # up to step 10, on the same 2 ranks: identical
    lr = {json.loads(r)["step"]: json.loads(r)["lr"] for r in (run / "metrics.jsonl").read_text().splitlines()}
    lr_full = {json.loads(r)["step"]: json.loads(r)["lr"] for r in (full / "metrics.jsonl").read_text().splitlines()}
    assert lr == pytest.approx(lr_full)  # the schedule went on where it was
    assert abs(_eval_loss(run) - _eval_loss(full)) < 0.05 * _eval_loss(full), (_eval_loss(run), _eval_loss(full))
