"""End-to-end: real ranks through the ``deepspeed`` launcher on the planted corpus (2 ranks, gloo).

One uninterrupted run of 2S steps, and the same run stopped after S steps then resumed to 2S. These
runs pin the static uniform mixture (the demo itself is GRAPE; tests/test_grape.py covers that path).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import launch

pytestmark = pytest.mark.slow

S = 20  # the split point; TINY runs 2S = 40 steps with checkpoints every 20


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _trace(run_dir: Path, rank: int) -> list[dict]:
    """The micro-batch draws of one rank (the trace also holds one weights row per round)."""
    rows = [json.loads(line) for line in (run_dir / "trace" / f"rank{rank}.jsonl").read_text().splitlines()]
    return [r for r in rows if "micro" in r]


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = run_dir / "checkpoints"
    tag = sorted(p.name for p in ckpt.iterdir() if (p / "COMPLETE").exists())[-1]
    assert tag == f"step{2 * S:08d}"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("runs")
    common = ["logging.trace_batches=true", "mixture.method=static"]
    launch(root, data_cache, [*common, "logging.run_name=full"])
    first = launch(root, data_cache, [*common, "logging.run_name=split"], args=["--stop-at", str(S)])
    second = launch(root, data_cache, [*common, "logging.run_name=split"])
    return {"full": root / "full", "split": root / "split", "first": first, "second": second}


def test_training_lowers_the_loss(runs):
    losses = _losses(runs["full"])
    assert sorted(losses) == list(range(1, 2 * S + 1))
    first, last = np.mean([losses[s] for s in range(1, 4)]), np.mean([losses[s] for s in range(2 * S - 2, 2 * S + 1)])
    assert last < first - 1.0, (first, last)


def test_exact_resume_losses_and_parameters(runs):
    assert "stopped" in runs["first"].stdout
    assert "resumed from checkpoint" in runs["second"].stdout + runs["second"].stderr
    full, split = _losses(runs["full"]), _losses(runs["split"])
    assert sorted(split) == list(range(1, 2 * S + 1))  # the resumed run rewrote nothing twice
    for step in range(S + 1, 2 * S + 1):
        assert split[step] == full[step], f"step {step}: {split[step]} != {full[step]}"
    a, b = _final_params(runs["full"]), _final_params(runs["split"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_ranks_draw_different_sequences_and_seeds_repeat(runs):
    full0, full1 = _trace(runs["full"], 0), _trace(runs["full"], 1)
    split0 = _trace(runs["split"], 0)
    assert len(full0) == len(full1) == 2 * S * 2  # 2S steps x 2 micro-batches
    assert all(a["windows"] != b["windows"] or a["domains"] != b["domains"] for a, b in zip(full0, full1))
    assert split0 == full0  # same seed: the same draws, including across the resume


def test_tensorboard_tags_written_by_rank_0_only(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = runs["full"] / "tensorboard"
    files = list(tb.glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # one writer: rank 1 writes nothing
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    domains = [f"domain_{k}" for k in range(6)]
    expected = {"train/loss", "train/lr", "train/tokens_per_sec"}
    expected |= {f"mixture/domain/{d}" for d in domains} | {f"mixture/realised/{d}" for d in domains}
    expected |= {f"eval/loss/{d}" for d in domains}
    assert expected <= tags, expected - tags
    realised = [acc.Scalars(f"mixture/realised/{d}")[-1].value for d in domains]
    assert sum(realised) == pytest.approx(1.0, abs=1e-5)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(5, 2 * S + 1, 5))


def test_run_directory_outputs(runs):
    run = runs["full"]
    mixture = json.loads((run / "mixture.json").read_text())
    assert mixture["domains"] == [f"domain_{k}" for k in range(6)]
    assert mixture["alpha"] == pytest.approx([1 / 6] * 6)
    assert len(mixture["history"]) == 1  # static: one entry
    assert (run / "config.yaml").exists() and json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 16
    evals = [json.loads(line) for line in (run / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [S, 2 * S]
    assert set(evals[-1]["domain_loss"]) == set(mixture["domains"])
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == [f"step{S:08d}", f"step{2 * S:08d}"]
