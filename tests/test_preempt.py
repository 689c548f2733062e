"""A run moved between world sizes: stopped on 2 ranks, resumed on 1, then on 2 again, through
DeepSpeed's universal checkpoint. (A signal that stops a run at a step boundary and the exact resume
that follows are tested under a real SLURM in tests/test_slurm.py, and with the ranks on two hosts in
tests/test_multinode.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.runs import REFERENCE_SETS, launch
from grape_ds.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow

SETS = REFERENCE_SETS


def _eval_loss(run: Path) -> float:
    return json.loads((run / "eval" / "eval.jsonl").read_text().splitlines()[-1])["domain_loss_avg"]


def test_resume_on_one_rank_and_back_on_two_keeps_the_step_the_weights_and_the_global_batch(tmp_path, data_cache,
                                                                                          reference_run):
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
    full = reference_run
    history = json.loads((full / "mixture.json").read_text())["history"]
    assert [h["step"] for h in moved_history] == [h["step"] for h in history]
    assert moved_history[:2] == history[:2]  # up to step 10, on the same 2 ranks: identical
    lr = {json.loads(r)["step"]: json.loads(r)["lr"] for r in (run / "metrics.jsonl").read_text().splitlines()}
    lr_full = {json.loads(r)["step"]: json.loads(r)["lr"] for r in (full / "metrics.jsonl").read_text().splitlines()}
    assert lr == pytest.approx(lr_full)  # the schedule went on where it was
    assert abs(_eval_loss(run) - _eval_loss(full)) < 0.05 * _eval_loss(full), (_eval_loss(run), _eval_loss(full))
