"""GRAPE on the engine, end to end with 2 real ranks under the deepspeed launcher.

- the planted corpus: grape finds the relevant domains and the hard task, doge raises the relevant
  domains, static stays exactly put (ground truth from grape_ds.data.planted);
- every rank holds identical alpha and z after every round;
- the probe changes nothing in training when the weights are frozen;
- exact resume reproduces the weight trajectory, stopping at a round boundary and between rounds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import launch
from grape_ds.bench import planted_figures
from grape_ds.config import PlantedConfig
from grape_ds.data import ground_truth

pytestmark = pytest.mark.slow

GRAPE = ["mixture.method=grape", "mixture.every=10"]


def _mixture(run: Path) -> dict:
    return json.loads((run / "mixture.json").read_text())


def _final_params(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = run / "checkpoints"
    tag = sorted(p.name for p in ckpt.iterdir() if (p / "COMPLETE").exists())[-1]
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _weight_trace(run: Path, rank: int) -> list[dict]:
    rows = map(json.loads, (run / "trace" / f"rank{rank}.jsonl").read_text().splitlines())
    return [r for r in rows if "alpha" in r]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("planted")
    short = ["train.max_steps=200", "train.warmup_steps=20", "train.micro_batch_size=8", "eval.every=0",
             "checkpoint.every=0", "logging.every=10"]
    for method in ("static", "doge", "grape"):
        sets = [*short, f"mixture.method={method}", f"logging.run_name={method}"]
        if method == "static":  # it only has to stay put: rounds every 10 steps over a shorter run
            sets += ["train.max_steps=40", "mixture.every=10"]
        else:
            sets += ["mixture.every=10", "logging.trace_batches=true"]
        launch(root, data_cache, sets, timeout=600)
    return root


def test_grape_finds_relevant_domains_and_the_hard_task(planted):
    truth = ground_truth(PlantedConfig())
    fig = planted_figures(_mixture(planted / "grape"), truth)
    assert fig["relevant_over_uniform"] >= 2.0, fig
    assert fig["top_task"] == truth.hard_task, fig


def test_doge_raises_relevant_domains_and_static_stays_put(planted):
    truth = ground_truth(PlantedConfig())
    doge = planted_figures(_mixture(planted / "doge"), truth)
    assert doge["relevant_over_uniform"] > 1.2, doge
    assert _mixture(planted / "doge")["z"] == pytest.approx([1 / 3] * 3)  # z frozen
    static = _mixture(planted / "static")
    assert static["alpha"] == [1 / 6] * 6 and static["z"] == [1 / 3] * 3 and len(static["history"]) == 1


def test_every_rank_holds_identical_weights_after_every_round(planted):
    for method in ("doge", "grape"):
        r0, r1 = _weight_trace(planted / method, 0), _weight_trace(planted / method, 1)
        assert [r["step"] for r in r0] == list(range(10, 201, 10))
        assert r0 == r1  # bit-identical alpha and z
        history = _mixture(planted / method)["history"][1:]
        assert [h["alpha"] for h in history] == [r["alpha"] for r in r0]


def test_tensorboard_has_the_reweighting_tags(planted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(planted / "grape" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    domains, tasks = [f"domain_{k}" for k in range(6)], [f"task_{n}" for n in range(3)]
    expected = {f"mixture/domain/{d}" for d in domains} | {f"mixture/task/{t}" for t in tasks}
    expected |= {f"mixture_avg/domain/{d}" for d in domains} | {f"mixture_avg/task/{t}" for t in tasks}
    expected |= {f"reweight/loss/{u}" for u in domains + tasks} | {f"reweight/grad_norm/{u}" for u in domains + tasks}
    expected |= {f"reweight/alignment/{d}" for d in domains}
    assert expected <= tags, expected - tags
    mixture = _mixture(planted / "grape")
    assert mixture["domains"] == domains and mixture["tasks"] == tasks
    assert {"alpha", "alpha_avg", "z", "z_avg", "history"} <= set(mixture)


def test_probe_with_frozen_weights_changes_nothing(tmp_path, data_cache):
    common = ["train.max_steps=30", "checkpoint.every=0", "eval.every=0"]
    launch(tmp_path, data_cache, [*common, "logging.run_name=off", "mixture.method=static"])
    launch(tmp_path, data_cache, [*common, "logging.run_name=on", *GRAPE, "mixture.mu_domain=0",
                                  "mixture.mu_task=0"])
    assert len(_mixture(tmp_path / "on")["history"]) == 4  # three rounds ran
    off, on = _final_params(tmp_path / "off"), _final_params(tmp_path / "on")
    for name in off:
        assert torch.equal(off[name], on[name]), name
    assert _losses(tmp_path / "off") == _losses(tmp_path / "on")


def test_exact_resume_reproduces_the_weight_trajectory(tmp_path, data_cache):
    """Stopped at a round boundary (20), resumed and stopped again between rounds, inside the in-band
    window (29), resumed to the end: the same weights, losses and parameters as one uninterrupted run."""
    common = [*GRAPE, "train.max_steps=40", "checkpoint.every=0", "eval.every=0"]
    launch(tmp_path, data_cache, [*common, "logging.run_name=full"])
    for stop in (20, 29):
        launch(tmp_path, data_cache, [*common, "logging.run_name=split"], args=["--stop-at", str(stop)])
        assert json.loads((tmp_path / "split" / "status.json").read_text())["step"] == stop
    launch(tmp_path, data_cache, [*common, "logging.run_name=split"])
    full, split = _mixture(tmp_path / "full"), _mixture(tmp_path / "split")
    assert len(full["history"]) == 5
    assert split["history"] == full["history"] and split["alpha_avg"] == full["alpha_avg"]
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")
    a, b = _final_params(tmp_path / "full"), _final_params(tmp_path / "split")
    assert all(torch.equal(a[n], b[n]) for n in a)
