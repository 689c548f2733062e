"""GRAPE on the engine, end to end with 2 real ranks (common.runs.launch).

- the planted corpus: grape finds the relevant domains and the hard task, doge raises the relevant
  domains (ground truth from grape_ds.data.planted); static staying exactly put is in test_train.py;
- every rank holds identical alpha and z after every round;
- every round's alpha and z of both runs equal the golden tests/assets/planted_trajectory.json
  (``GRAPE_DS_UPDATE_GOLDEN=1`` rewrites it, so a change to the numbers is a visible diff);
- the weights TensorBoard reports are the ones sampled (one floor, in the controller), and every
  domain is measured in every round: an in-band domain no rank drew in the window gets a probe batch.

The frozen-probe and exact-resume guarantees are asserted in tests/test_gpu_check.py, by the GPU
check's own code run on 2 CPU ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.runs import launch
from grape_ds.bench import planted_figures
from grape_ds.config import PlantedConfig
from grape_ds.data import ground_truth

pytestmark = pytest.mark.slow

def _mixture(run: Path) -> dict:
    return json.loads((run / "mixture.json").read_text())


def _weight_trace(run: Path, rank: int) -> list[dict]:
    rows = map(json.loads, (run / "trace" / f"rank{rank}.jsonl").read_text().splitlines())
    return [r for r in rows if "alpha" in r]


STEPS = {"doge": 100, "grape": 200}  # doge clears its bar (1.2x) by step 50, grape its (2x) by 150-200


@pytest.fixture(scope="module")
def planted(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("planted")
    short = ["train.warmup_steps=20", "train.micro_batch_size=8", "eval.every=0", "checkpoint.every=0",
             "logging.every=10"]
    for method, steps in STEPS.items():
        sets = [*short, f"train.max_steps={steps}", f"mixture.method={method}", f"logging.run_name={method}",
                "mixture.every=10", "logging.trace_batches=true"]
        launch(root, data_cache, sets, timeout=600)
    return root


GOLDEN = Path(__file__).parent / "assets" / "planted_trajectory.json"


def _render_trajectory(trajectory: dict[str, list[dict]]) -> str:
    """The golden file's layout: one round per line, so a change to the numbers is a visible diff."""
    methods = []
    for method, rounds in trajectory.items():
        lines = ",\n".join("    " + json.dumps({"step": r["step"], "alpha": r["alpha"], "z": r["z"]})
                           for r in rounds)
        methods.append(f"  {json.dumps(method)}: [\n{lines}\n  ]")
    return "{\n" + ",\n".join(methods) + "\n}\n"


def test_planted_trajectory_matches_the_golden(planted):
    """Every round's alpha and z of both planted runs equal tests/assets/planted_trajectory.json, so a
    refactor that changes the numbers fails here. ``GRAPE_DS_UPDATE_GOLDEN=1`` rewrites the asset
    instead (commit it with the change that moved the numbers, and say why)."""
    runs = {method: [{k: h[k] for k in ("step", "alpha", "z")} for h in _mixture(planted / method)["history"]]
            for method in STEPS}
    if os.environ.get("GRAPE_DS_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(_render_trajectory(runs))
        return
    golden = json.loads(GOLDEN.read_text())
    assert list(golden) == list(STEPS)
    for method, rounds in runs.items():
        expected = golden[method]
        assert [r["step"] for r in rounds] == [g["step"] for g in expected], method
        for got, want in zip(rounds, expected):
            where = (method, got["step"])
            assert got["alpha"] == pytest.approx(want["alpha"], rel=1e-6, abs=1e-9), where
            assert got["z"] == pytest.approx(want["z"], rel=1e-6, abs=1e-9), where


def test_grape_finds_relevant_domains_and_the_hard_task(planted):
    truth = ground_truth(PlantedConfig())
    fig = planted_figures(_mixture(planted / "grape"), truth)
    assert fig["relevant_over_uniform"] >= 2.0, fig
    assert fig["top_task"] == truth.hard_task, fig


def test_doge_raises_relevant_domains(planted):
    truth = ground_truth(PlantedConfig())
    doge = planted_figures(_mixture(planted / "doge"), truth)
    assert doge["relevant_over_uniform"] > 1.2, doge
    assert _mixture(planted / "doge")["z"] == pytest.approx([1 / 3] * 3)  # z frozen


def test_every_rank_holds_identical_weights_after_every_round(planted):
    for method in ("doge", "grape"):
        r0, r1 = _weight_trace(planted / method, 0), _weight_trace(planted / method, 1)
        assert [r["step"] for r in r0] == list(range(10, STEPS[method] + 1, 10))
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
    # every scalar once per step (a round on a logging step once wrote each mixture/* value twice)
    from collections import Counter

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    writes = Counter()
    for events in sorted((planted / "grape" / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            writes.update((v.tag, event.step) for v in event.summary.value)
    assert writes[("mixture/domain/domain_0", 10)] == 1
    assert [key for key, n in writes.items() if n > 1] == []
    mixture = _mixture(planted / "grape")
    assert mixture["domains"] == domains and mixture["tasks"] == tasks
    assert {"alpha", "alpha_avg", "z", "z_avg", "history"} <= set(mixture)


def _scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_reported_weights_are_the_sampled_ones(planted):
    """mixture/domain (the sampler's probabilities) equals the controller's alpha after every round:
    no second floor between what is reported and what is drawn."""
    tb = _scalars(planted / "grape")
    for entry in _mixture(planted / "grape")["history"][1:]:
        logged = [tb[f"mixture/domain/domain_{k}"][entry["step"]] for k in range(6)]
        assert logged == pytest.approx(entry["alpha"], abs=1e-7)  # TensorBoard keeps float32


def test_every_domain_is_measured_every_round(planted):
    """With in-band domain gradients, the domains no rank drew in a round's window (trace) are the
    ones probed with a probe batch (reweight/inband_probed), so every domain has a gradient in every
    round and the task update's train direction keeps all of alpha."""
    tb, every, window = _scalars(planted / "grape"), 10, 2
    rows = [r for rank in (0, 1) for r in map(json.loads, (planted / "grape" / "trace" / f"rank{rank}.jsonl")
                                               .read_text().splitlines()) if "micro" in r]
    probed = []
    for step in range(every, STEPS["grape"] + 1, every):
        drawn = {d for r in rows if step - window < r["step"] <= step for d in r["domains"]}
        assert tb["reweight/inband_probed"][step] == 6 - len(drawn), step
        probed.append(6 - len(drawn))
        for k in range(6):
            assert tb[f"reweight/grad_norm/domain_{k}"][step] > 0, (step, k)
    assert sum(probed) > 0  # the window missed some domain in some round, and it was measured anyway
    cosines = [tb[f"reweight/cosine/domain_{k}/task_{n}"][every] for k in range(6) for n in range(3)]
    assert all(-1 <= c <= 1 for c in cosines)
