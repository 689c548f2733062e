"""The gradient probe: exactness of the exact estimator, sketch accuracy, no effect on training
gradients, and the all-reduce over two real ranks."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from common.distributed import run_distributed
from grape_ds.probe import GradientProbe

V = 256


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=V, bos_token_id=V - 1,
                     eos_token_id=V - 1, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(cfg).to(dtype)


def _batches(n_units, seed=0, size=4):
    g = torch.Generator().manual_seed(seed)
    # unit u draws from its own token range so the gradients differ in a structured way
    return [torch.randint(32 * u, 32 * u + 96, (size, 32), generator=g) % V for u in range(n_units)]


def _capture(model, probe, batches, also=()):
    grads = []
    for u, x in enumerate(batches):
        loss = model(input_ids=x, labels=x).loss
        with ExitStack() as stack:
            for p in (probe, *also):
                stack.enter_context(p.unit(u))
            g = torch.autograd.grad(loss, probe.params)
        for p in (probe, *also):
            p.record(u, loss.item(), len(x))
        grads.append(torch.cat([t.reshape(-1) for t in g]).double())
    return torch.stack(grads)  # [U, P]


def test_exact_estimator_is_the_flattened_gradient_and_tied_weights_count_once():
    model = _model()
    probe = GradientProbe(model, 3, "exact")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert probe.numel == sum(p.numel() for p in model.parameters())  # wte/lm_head once
    full = _capture(model, probe, _batches(3))
    proj, losses, seqs = probe.reduce()
    assert torch.allclose(proj.double(), full, atol=1e-6)
    assert seqs.tolist() == [4, 4, 4]
    assert torch.allclose(GradientProbe.gram(proj), full @ full.T, rtol=1e-5)
    assert probe.buffer.abs().sum() == 0  # reduce() resets


def test_sketch_gram_is_close_to_exact_and_small():
    model = _model()
    exact = GradientProbe(model, 4, "exact")
    sketch = GradientProbe(model, 4, "sketch", dim=8192, seed=3)
    _capture(model, exact, _batches(4), also=[sketch])  # both probes see the same backward
    ge, gs = GradientProbe.gram(exact.reduce()[0]), GradientProbe.gram(sketch.reduce()[0])
    assert ((ge - gs).norm() / ge.norm()).item() < 0.1
    param_bytes = 4 * exact.numel
    assert sketch.memory_bytes() < 0.5 * param_bytes  # never a P x m matrix; signs packed in bits


def test_probe_never_changes_training_gradients():
    x = _batches(1)[0]
    grads = []
    for with_probe in (False, True):
        model = _model()
        if with_probe:
            probe = GradientProbe(model, 1, "sketch", dim=512)
            with probe.unit(0, scale=2.0):
                model(input_ids=x, labels=x).loss.backward()
        else:
            model(input_ids=x, labels=x).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_bf16_gradients_accumulate_in_fp32():
    model = _model(dtype=torch.bfloat16)
    probe = GradientProbe(model, 2, "sketch", dim=256)
    _capture(model, probe, _batches(2))
    proj, _, _ = probe.reduce()
    assert proj.dtype == torch.float32 and torch.isfinite(proj).all() and proj.abs().sum() > 0


def _two_rank_exact(rank, world_size):
    model = _model()
    probe = GradientProbe(model, 3, "exact")
    batches = _batches(3, seed=10 + rank)  # every rank has its own batch per unit
    _capture(model, probe, batches)
    proj, losses, seqs = probe.reduce()
    return GradientProbe.gram(proj), losses, seqs


@pytest.mark.slow  # 2 real processes on gloo
def test_exact_gram_reduced_over_two_ranks_equals_single_process_union():
    (g0, l0, s0), (g1, l1, s1) = run_distributed(_two_rank_exact, world_size=2)
    assert torch.equal(g0, g1) and torch.equal(l0, l1)
    assert s0.tolist() == [8, 8, 8]
    # one process, the union of both ranks' batches per unit
    model = _model()
    union = [torch.cat(pair) for pair in zip(_batches(3, seed=10), _batches(3, seed=11))]
    probe = GradientProbe(model, 3, "exact")
    full = _capture(model, probe, union)
    assert torch.allclose(g0, full @ full.T, rtol=1e-5, atol=1e-7)
    assert torch.allclose(l0.double(), torch.tensor([probe.stats[u, 0].item() for u in range(3)]).double(), rtol=1e-5)


def test_sketch_is_unbiased_over_projection_draws_and_drawn_afresh_each_round():
    """E<Sa, Sb> = <a, b> over draws of the projection: with one projection per round (set_round),
    the mean over many rounds of a sketched inner product is within its standard error of the exact
    one, whereas any single projection is off by its own fixed error."""
    model = _model()
    a_b = [torch.autograd.grad(model(input_ids=x, labels=x).loss, list(model.parameters())) for x in _batches(2)]
    exact = sum(float((ga.double() * gb.double()).sum()) for ga, gb in zip(*a_b))
    probe = GradientProbe(model, 2, "sketch", dim=64, seed=5)
    draws = []
    for r in range(300):
        probe.set_round(r)
        for u, grads in enumerate(a_b):
            with probe.unit(u):
                for i, g in enumerate(grads):
                    probe._add(i, g)  # what the hooks do with these gradients
            probe.record(u, 1.0, 1)
        proj, _, _ = probe.reduce()
        draws.append(float(GradientProbe.gram(proj)[0, 1]))
    draws = np.array(draws)
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert abs(draws.mean() - exact) < 3 * se, (draws.mean(), exact, se)
    assert draws.std() > 0.05 * abs(exact)   # each round's projection differs (m = 64 is noisy)
    probe.set_round(7)
    again = probe.signs[0].clone()
    probe.set_round(8)
    probe.set_round(7)
    assert torch.equal(again, probe.signs[0])  # a pure function of (seed, round): resume is exact
