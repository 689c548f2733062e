"""Precision with the gradient probe: fp16 with dynamic loss scaling, end to end on 2 real ranks.

Under fp16, ``engine.backward`` multiplies the loss by DeepSpeed's current loss scale, so every
gradient the probe's hooks see is scaled, and a step whose gradients overflow is skipped. The run
starts at a loss scale of 2^20 so that its first steps overflow (in-band ones included): their
contributions must be dropped, and every gradient the controller sees must be unscaled.
"""

from __future__ import annotations

import json

import pytest
import torch

from common.runs import REPO, launch

# DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels (AVX512-FP16/AMX, e.g.
# Intel Sapphire Rapids); elsewhere it refuses the engine ("Type fp16 is not supported on your device")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_fp16_supported(),
                                 reason="this CPU has no fp16 kernels, and DeepSpeed's CPU accelerator refuses fp16")]


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("fp16")
    ds = json.loads((REPO / "ds_configs" / "zero2_fp16.json").read_text())
    ds["fp16"].update(initial_scale_power=20, hysteresis=1)
    (root / "fp16.json").write_text(json.dumps(ds))
    proc = launch(root, data_cache, ["mixture.method=grape", "mixture.every=5", "train.max_steps=20",
                                     "eval.every=0", "checkpoint.every=0", f"deepspeed.config={root / 'fp16.json'}",
                                     "logging.run_name=fp16"], strict_devices=True)
    return root / "fp16", proc.stdout + proc.stderr


def test_overflowed_steps_leave_the_round_and_rounds_go_on(fp16_run):
    run, log = fp16_run
    assert "overflowed (fp16) and was skipped; its in-band gradients are left out of the round" in log
    mixture = json.loads((run / "mixture.json").read_text())
    assert mixture["rounds"] == 4 and mixture["skipped_rounds"] == 0, mixture


def test_probe_sees_unscaled_gradients(fp16_run):
    """Task gradient norms of the order of fp32 ones (about 0.1-10 on this model), not x 2^16."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _ = fp16_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    norms = [e.value for t in ("task_0", "task_1", "task_2") for e in acc.Scalars(f"reweight/grad_norm/{t}")]
    assert len(norms) == 12 and all(0 < v < 100 for v in norms), norms
