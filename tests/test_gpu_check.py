"""The prepared GPU check (scripts/gpu_check.sh) run on the CPU with 2 gloo ranks: the same code that
checks grape-ds on a lent GPU asserts here, on every CI run, that

- the probe with frozen weights changes nothing in training (dropout 0.1: the probe's forwards
  draw from isolated generators) and
- a run stopped at a round boundary, resumed, stopped again inside an in-band window and resumed to
  the end reproduces the uninterrupted run exactly (losses, weight history, parameters; each rank's
  random state travels in the checkpoint),

and that ``grape-ds bench throughput`` prints its figures (tiny model; CPU figures mean nothing for
GPUs). The runs are bf16 (fp32 on a CPU without native bf16, where torch emulates it slowly) under
ZeRO-2 with deterministic kernels, under the device check.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from common.runs import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("gpu_check")
    # Sized for the CPU (the check's logic, not its figures): 2 sequences per micro-batch and per probe
    # batch, throughput runs of 6 steps (5 skipped as start-up, then one step with a grape/3 round).
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(out), "--", "--ranks", "2",
                           "--bench-steps", "6", "--set", f"data.cache_dir={data_cache}",
                           "--set", "train.micro_batch_size=2", "--set", "probe.batch_size=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    results = json.loads((out / "gpu_check.json").read_text())
    return proc, results


def test_the_check_runs_to_the_end_and_passes(gpu_check):
    proc, results = gpu_check
    assert list(results) == ["environment", "full", "exact_resume", "frozen_probe", "throughput"]
    failed = {k: v.get("error", v) for k, v in results.items() if not v["ok"]}
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert "gpu_check: all checks held" in proc.stdout
    full = results["full"]
    assert full["rounds"] == 4 and full["skipped_rounds"] == 0 and full["last_loss"] < full["first_loss"]


def test_probe_with_frozen_weights_changes_nothing(gpu_check):
    frozen = gpu_check[1]["frozen_probe"]
    assert frozen["rounds"] == 4  # the probe ran (every 3 of 12 steps), with step sizes 0
    assert frozen["max_param_diff"] == 0 and frozen["max_loss_diff"] == 0, frozen


def test_exact_resume_reproduces_the_weight_trajectory(gpu_check):
    resume = gpu_check[1]["exact_resume"]
    assert resume["stopped_at"] == [6, 8]  # a round boundary, then inside the in-band window 8-9
    assert resume["steps"] and resume["same_weight_history"], resume
    assert resume["max_param_diff"] == 0 and resume["max_loss_diff"] == 0, resume


def test_bench_throughput_reports_every_variant(gpu_check):
    fig = gpu_check[1]["throughput"]
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert fig["model"] == "tiny" and fig["precision"] == ("bf16" if native_bf16 else "fp32") and fig["params"] > 0
    for variant in ("plain", "static", "grape/3"):
        assert fig[variant]["tokens_per_sec_per_device"] > 0 and fig[variant]["peak_memory_bytes"] > 0
        assert fig[variant]["mfu"] is None  # no peak FLOP/s known for a CPU unless --peak-tflops
    assert fig["static_over_plain"] > 0 and fig["grape3_over_static"] > 0
    assert fig["flops_per_token"] == 6 * fig["params"] + 12 * 2 * 4 * 32 * 128
