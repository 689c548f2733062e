"""Device discipline on a CPU-only machine (grape_ds/devices.py; README, "Device discipline").

PyTorch's ``meta`` device stands in for a GPU: a model moved there after the gradient probe was
built, as ``deepspeed.initialize`` moves it to the accelerator, must be followed by the probe's
buffers; a tensor that grape-ds code creates without naming its device is caught by the check mode;
a collective refuses a tensor that is not on the process's device. The whole training path runs
under the check mode in every end-to-end test (tests/conftest.py sets GRAPE_DS_CHECK_DEVICES=1).
"""

from __future__ import annotations

import types

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from grape_ds import devices
from grape_ds.distributed import all_reduce_sum
from grape_ds.probe import GradientProbe

V = 128


def _model():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=V, bos_token_id=V - 1,
                     eos_token_id=V - 1, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(cfg)


@pytest.fixture
def meta_device():
    """The process's device is ``meta`` (what init_distributed records as ``cuda:N`` on a GPU)."""
    devices.set_device("meta")
    yield torch.device("meta")
    devices.set_device("cpu")


@pytest.mark.parametrize("estimator", ["sketch", "exact"])
def test_probe_follows_gradients_from_the_engine_device(estimator, meta_device):
    """The probe is built before deepspeed.initialize, while the model is on the CPU; then its hooks
    fire with gradients on the engine's device. (Moving a model to ``meta`` replaces its parameters,
    so the meta gradients are handed to the probe's hook entry point directly.)"""
    model = _model()
    probe = GradientProbe(model, 2, estimator, dim=64)
    grads = [torch.ones_like(p, device="meta") for p in probe.params]
    with devices.DeviceCheck():                          # raises on any op that mixes devices
        with probe.unit(1, scale=2.0):
            for i, g in enumerate(grads):
                probe._add(i, g)                          # what each parameter's hook does
        probe.record(1, torch.ones((), device="meta"), 2)
        proj, losses, seqs = probe.reduce()               # the all-reduce checks the device too
    assert probe.device.type == "meta"
    assert {proj.device.type, losses.device.type, seqs.device.type} == {"meta"}
    assert all(s.device.type == "meta" for s in probe.signs)


def test_probe_built_on_the_engine_device_keeps_its_buffers_there(meta_device):
    with torch.device("meta"):
        model = _model()
    probe = GradientProbe(model, 2, "sketch", dim=64, staged=True)
    x = torch.zeros(2, 16, dtype=torch.long, device="meta")
    with devices.DeviceCheck():
        loss = model(input_ids=x, labels=x).loss
        with probe.unit(0, scale=0.5):
            torch.autograd.grad(loss, probe.params)
        probe.record(0, loss, 2)
        probe.commit_step()
        proj, _, _ = probe.reduce()
    assert proj.device.type == "meta" and probe.device.type == "meta"


def test_check_mode_sends_tensors_made_without_a_device_to_meta(tmp_path):
    """Code is recognised by its file, so grape_ds/train.py run as ``__main__`` is checked too."""
    pkg = tmp_path / "pkg"
    mod = types.ModuleType("__main__")
    code = ("import torch\n"
            "def make():\n"
            "    return torch.zeros(3), torch.tensor([1.0]), torch.ones(2, device='cpu')\n")
    exec(compile(code, str(pkg / "train.py"), "exec"), mod.__dict__)
    with devices.DeviceCheck(root=str(pkg), mixing=False):
        unnamed, literal, named = mod.make()
        outside = torch.zeros(2)  # not grape_ds code: untouched
    assert unnamed.device.type == literal.device.type == "meta"
    assert named.device.type == outside.device.type == "cpu"


def test_check_mode_refuses_an_op_that_mixes_devices():
    with devices.DeviceCheck(), pytest.raises(devices.DeviceMixError, match="cpu.*meta|meta.*cpu"):
        torch.zeros(3, device="cpu").add_(torch.ones(3, device="meta"))  # PyTorch alone lets this pass


def test_collective_refuses_a_tensor_off_the_process_device():
    assert devices.current().type == "cpu"
    all_reduce_sum(torch.zeros(2, device="cpu"))
    with pytest.raises(RuntimeError, match="tensor on meta.*communicates on cpu"):
        all_reduce_sum(torch.zeros(2, device="meta"))


def test_isolated_rng_leaves_training_draws_unchanged():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with devices.isolated_rng(torch.device("cpu")):
        torch.rand(100)  # a probe forward's dropout masks
    assert torch.equal(torch.rand(4), expected)


def test_staged_probe_drops_a_skipped_step_and_keeps_committed_ones():
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    plain, staged = _model(), _model()
    p_plain = GradientProbe(plain, 1, "exact")
    p_staged = GradientProbe(staged, 1, "exact", staged=True)
    for model, probe in ((plain, p_plain), (staged, p_staged)):
        model.eval()
        loss = model(input_ids=x, labels=x).loss
        with probe.unit(0):
            torch.autograd.grad(loss, probe.params)
        probe.record(0, loss, 2)
    p_staged.commit_step()
    loss = staged(input_ids=x, labels=x).loss  # a step that overflowed: its contribution is dropped
    with p_staged.unit(0, scale=float("inf")):
        torch.autograd.grad(loss, p_staged.params)
    p_staged.record(0, float("inf"), 2)
    p_staged.discard_step()
    (a, la, sa), (b, lb, sb) = p_plain.reduce(), p_staged.reduce()
    assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(sa, sb)
    with pytest.raises(RuntimeError, match="staged"):
        p_plain.discard_step()
