"""The controller against an independent reference (tests/common/reference_grape.py), fed the same real
gradients: a small GPT-2's flattened gradients of actual batches (so the Gram matrix is positive
semi-definite, as a run's is), over several rounds with the model trained between them.

Each round draws one batch per domain and per task, and (research form) train-mixture batches from
alpha and target-mixture batches from the z the task update sets, every sequence's unit drawn on its
own, as the research code's mixture loaders do. The reference works on the vectors; the controller
gets their Gram matrix and losses, as a run gives it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from grape_ds.controller import MethodParams, MixtureController, RoundStats
from common import reference_grape
from common.reference_grape import Reference

V, T, B = 64, 16, 2            # vocabulary, sequence length, mixture batches per round
K, N = 3, 2                    # domains, tasks
RANGES = [(0, 24), (20, 44), (40, 64)]  # each domain's tokens (overlapping a little)
TASKS = [[0], [1, 2]]          # the domains each task's text comes from
ROUNDS = 4


def _model():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=T, vocab_size=V, bos_token_id=V - 1,
                     eos_token_id=V - 1, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(cfg).double()


def _sequence(rng, domain: int) -> np.ndarray:
    lo, hi = RANGES[domain]
    return rng.integers(lo, hi, size=T)


def _grad(model, rows: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """The flattened gradient of the batch's mean loss (float64), and the loss."""
    x = torch.from_numpy(np.stack(rows))
    loss = model(input_ids=x, labels=x).loss
    g = torch.autograd.grad(loss, [p for p in model.parameters()])
    return torch.cat([t.reshape(-1) for t in g]).numpy(), float(loss.detach())


def _domain_batch(rng, d, size=4):
    return [_sequence(rng, d) for _ in range(size)]


def _task_batch(rng, n, size=4):
    return [_sequence(rng, TASKS[n][i % len(TASKS[n])]) for i in range(size)]


def _mixture_batch(rng, probs, make, size=6):
    units = rng.choice(len(probs), size=size, p=probs)
    return [make(rng, int(u), 1)[0] for u in units]


@pytest.mark.parametrize("form", ["research", "alignment"])
@pytest.mark.parametrize("variant", ["grape", "grape_ema", "grape_gap", "doge"])
def test_controller_matches_the_reference_round_after_round(variant, form):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rng = np.random.default_rng(1)
    tau = 1.0  # binds for some gradients and not for others on this model
    reference_grape.CLIPS.update(bound=0, free=0)
    p = MethodParams(mu_domain=1.5, mu_task=5.0, form=form, tau=tau, task_smoothing=1e-3, ema_beta=0.9, floor=0.0)
    ctl = MixtureController(variant, [f"d{k}" for k in range(K)], [f"t{n}" for n in range(N)], params=p)
    ref = Reference(variant, form, K, N, p.mu_domain, p.mu_task, tau, p.task_smoothing, p.ema_beta)
    for r in range(ROUNDS):
        dom = [_grad(model, _domain_batch(rng, d)) for d in range(K)]
        task = [_grad(model, _task_batch(rng, n)) for n in range(N)]
        train = [_grad(model, _mixture_batch(rng, ref.alpha, _domain_batch)) for _ in range(B)] \
            if form == "research" and variant != "doge" else []
        target: list = []

        def draw_target(z):  # drawn from the z the task update has just set
            target.extend(_grad(model, _mixture_batch(rng, z, _task_batch)) for _ in range(B))
            return [g for g, _ in target], [loss for _, loss in target]

        ref.round([g for g, _ in dom], [g for g, _ in task], [loss for _, loss in task], [g for g, _ in train],
                  draw_target)
        rows = dom + task + train + target
        vectors = np.stack([g for g, _ in rows])                       # [U, P]
        stats = RoundStats(losses=np.array([loss for _, loss in rows]), gram=vectors @ vectors.T,
                           counts=np.full(len(rows), 4), num_domains=K, train_batches=len(train),
                           target_batches=len(target))
        assert ctl.round(10 * (r + 1), stats)
        np.testing.assert_allclose(ctl.z, ref.z, rtol=1e-9, atol=1e-12, err_msg=f"z after round {r + 1}")
        np.testing.assert_allclose(ctl.alpha, ref.alpha, rtol=1e-9, atol=1e-12, err_msg=f"alpha after round {r + 1}")
        x = torch.from_numpy(np.stack(_domain_batch(rng, int(rng.integers(K)), 8)))  # train between rounds
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert ctl.rounds == ROUNDS
    assert not np.allclose(ctl.alpha, 1 / K)  # the weights moved
    if form == "research":  # clipping bound for some gradients and not for others
        assert reference_grape.CLIPS["bound"] > 0 and reference_grape.CLIPS["free"] > 0, reference_grape.CLIPS
