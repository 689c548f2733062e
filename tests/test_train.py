"""End-to-end: real ranks on the planted corpus (2 ranks, gloo, started as the deepspeed launcher does).

One run of 2S steps with a static mixture that gives domain_0 a weight of 0 and the others equal
ones (the demo itself is GRAPE; tests/test_grape.py covers that path). Exact resume is asserted on
GRAPE runs, which take every path a static run takes and more: stopped and resumed in
tests/test_gpu_check.py, signalled under SLURM in tests/test_slurm.py and on two hosts in
tests/test_multinode.py, moved between world sizes in tests/test_preempt.py, after a corrupt
checkpoint in tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.runs import launch

pytestmark = pytest.mark.slow

S = 20  # TINY runs 2S = 40 steps, with checkpoints and evaluations every S
WEIGHTS = [0, 1, 1, 1, 1, 1]  # a static weight of 0 means never drawn


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _trace(run_dir: Path, rank: int) -> list[dict]:
    """The micro-batch draws of one rank (the trace also holds one weights row per round)."""
    rows = [json.loads(line) for line in (run_dir / "trace" / f"rank{rank}.jsonl").read_text().splitlines()]
    return [r for r in rows if "micro" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("runs")
    launch(root, data_cache, ["logging.trace_batches=true", "mixture.method=static", "logging.run_name=full",
                              f"mixture.weights={WEIGHTS}"])
    return {"full": root / "full"}


def test_training_lowers_the_loss(runs):
    losses = _losses(runs["full"])
    assert sorted(losses) == list(range(1, 2 * S + 1))
    first, last = np.mean([losses[s] for s in range(1, 4)]), np.mean([losses[s] for s in range(2 * S - 2, 2 * S + 1)])
    assert last < first - 1.0, (first, last)


def test_ranks_draw_different_sequences_and_seeds_repeat(runs):
    """Each rank's draws are its own, and a pure function of (seed, rank, step, micro-batch, weights):
    a sampler built afresh from the run's config draws exactly what the run drew (so a resumed run,
    which builds its sampler afresh, continues the uninterrupted run's stream)."""
    from grape_ds.data import MixtureSampler, prepare_data
    from grape_ds.rundir import load_run_config

    full0, full1 = _trace(runs["full"], 0), _trace(runs["full"], 1)
    assert len(full0) == len(full1) == 2 * S * 2  # 2S steps x 2 micro-batches
    assert all(a["windows"] != b["windows"] or a["domains"] != b["domains"] for a, b in zip(full0, full1))
    cfg = load_run_config(runs["full"])
    data = prepare_data(cfg.data)
    for rank, trace in ((0, full0), (1, full1)):
        sampler = MixtureSampler([data.num_windows(d, "train") for d in data.domains], WEIGHTS,
                                 seed=cfg.train.seed, rank=rank,
                                 micro_batch_size=cfg.train.micro_batch_size)
        for row in trace:
            draw = sampler.draw(row["step"] - 1, row["micro"])
            assert (draw.domains.tolist(), draw.windows.tolist()) == (row["domains"], row["windows"])


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
    assert mixture["alpha"] == [0.0] + [0.2] * 5 and mixture["z"] == [1 / 3] * 3  # static: exactly put
    assert len(mixture["history"]) == 1  # rounds were due every 10 steps; static keeps one entry
    assert (run / "config.yaml").exists() and json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 16
    evals = [json.loads(line) for line in (run / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [S, 2 * S]
    assert set(evals[-1]["domain_loss"]) == set(mixture["domains"])
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == [f"step{S:08d}", f"step{2 * S:08d}"]


def test_static_weight_of_zero_is_never_drawn_and_the_rest_as_written(runs):
    draws = [d for rank in (0, 1) for row in _trace(runs["full"], rank) for d in row["domains"]]
    counts = np.bincount(draws, minlength=6)
    assert counts[0] == 0 and counts.sum() == 2 * 2 * S * 2 * 4  # 2 ranks x 2S steps x 2 micro x 4
    assert np.all(counts[1:] > 0)
