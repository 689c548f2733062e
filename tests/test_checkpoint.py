"""Checkpoints: completeness, keep-last-N, fallback to the previous one, starting over."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from common.runs import DEMO, REPO, TINY
from grape_ds.checkpoint import MARKER, complete_checkpoints
from grape_ds.launch import train_command


def test_only_marked_checkpoints_are_complete(tmp_path):
    for step, marked in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"step{step:08d}"
        d.mkdir()
        if marked:
            (d / MARKER).write_text("{}")
    (tmp_path / "latest").write_text("step00000030")
    assert complete_checkpoints(tmp_path) == [(10, "step00000010"), (20, "step00000020")]
    assert complete_checkpoints(tmp_path / "missing") == []


def _run_single(run_root: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    """One rank, no launcher (init_distributed makes a 1-process group)."""
    cmd = train_command(DEMO, [*TINY, "checkpoint.every=2", "checkpoint.keep_last=2", "eval.every=0",
                               f"logging.output_dir={run_root}", f"data.cache_dir={cache}", "logging.run_name=one"],
                        extra)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_a_checkpoint_is_whole_only_while_every_file_is_as_written(tmp_path):
    import json
    import os

    from grape_ds.checkpoint import MARKER, _file_list, verify_checkpoint
    path = tmp_path / "step00000010"
    path.mkdir()
    for name in ("mp_rank_00_model_states.pt", "rank0_state.pt", "rank1_state.pt"):
        (path / name).write_bytes(b"x" * 10)
    (path / MARKER).write_text(json.dumps({"step": 10, "files": _file_list(path)}))
    assert verify_checkpoint(path) is None
    (path / "rank1_state.pt").unlink()
    assert verify_checkpoint(path) == "rank1_state.pt is missing (written by the run, deleted since)"
    (path / "rank1_state.pt").write_bytes(b"y" * 3)
    assert "rank1_state.pt has 3 bytes, 10 when" in verify_checkpoint(path)
    (path / "rank1_state.pt").write_bytes(b"y" * 10)
    os.utime(path / "rank1_state.pt", ns=(1, 1))
    assert "rank1_state.pt was modified after" in verify_checkpoint(path)
    (path / MARKER).write_text(json.dumps({"step": 10}))  # an older grape-ds's marker: no list
    assert verify_checkpoint(path) is None


def test_a_save_on_a_full_disk_says_so(tmp_path):
    import errno

    from grape_ds.checkpoint import Checkpointer
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step00000010").mkdir(parents=True)
    (ckpt / "step00000010" / "COMPLETE").write_text('{"step": 10}')
    error = Checkpointer(ckpt, 10, 2)._save_error(OSError(errno.ENOSPC, "No space left on device"), 20)
    assert str(error).startswith(f"the disk is full: saving the checkpoint of step 20 to {ckpt} failed (")
    assert "the newest complete checkpoint (step 10) is intact" in str(error)
    other = Checkpointer(ckpt, 10, 2)._save_error(PermissionError(errno.EACCES, "Permission denied"), 20)
    assert "Permission denied" in str(other) and "disk is full" not in str(other)


@pytest.mark.slow
def test_keep_last_fallback_on_corrupt_checkpoint_and_start_over(tmp_path, data_cache):
    run = tmp_path / "one"
    _run_single(tmp_path, data_cache, "--stop-at", "6")
    ckpt = run / "checkpoints"
    assert [s for s, _ in complete_checkpoints(ckpt)] == [4, 6]  # keep_last=2 pruned step 2
    before = _losses(run)

    # Corrupt the newest checkpoint: resume reports it and falls back to step 4.
    states = next((ckpt / "step00000006").glob("*model_states.pt"))
    states.write_bytes(states.read_bytes()[:100])
    proc = _run_single(tmp_path, data_cache, "--stop-at", "8")
    out = proc.stdout + proc.stderr
    assert "step00000006 failed to load" in out and "resumed from checkpoint" in out
    assert "mp_rank_00_model_states.pt has 100 bytes" in out  # the message names the file
    after = _losses(run)
    assert sorted(after) == list(range(1, 9))
    assert after[5] == before[5] and after[6] == before[6]  # steps 5-6 recomputed exactly


def test_starting_over_keeps_the_previous_attempt_aside(tmp_path):
    """What --no-resume does to an existing run directory before anything is written into it."""
    from grape_ds.train import _set_aside

    run = tmp_path / "one"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    _set_aside(run)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("one.replaced-")]
    assert not run.exists() and len(aside) == 1
    assert (aside[0] / "checkpoints").is_dir() and (aside[0] / "metrics.jsonl").read_text() == '{"step": 1}\n'
    run.mkdir()
    _set_aside(run)  # an empty directory has nothing to keep
    assert run.is_dir() and len([p for p in tmp_path.iterdir() if p.name.startswith("one.replaced-")]) == 1
