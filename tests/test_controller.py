"""Controller methods against hand-computed numbers, and the controller's bookkeeping.

The example: K=2 domains, N=2 tasks, units (d0, d1, t0, t1) with Gram matrix G and losses l below.
W = G[:2, 2:] = [[2, 0], [0, 1]]: d0 helps t0 only, d1 helps t1 only.
"""

import json

import numpy as np
import pytest

from grape_ds.controller import METHOD_FNS, MethodParams, MixtureController, RoundStats, softmax_step

G = np.array([[4, 1, 2, 0], [1, 1, 0, 1], [2, 0, 4, 0], [0, 1, 0, 1.0]])
L = np.array([3, 2, 2, 4.0])
HALF = {"alpha": np.array([0.5, 0.5]), "z": np.array([0.5, 0.5]), "ema": None}


def _stats(gram=G, losses=L, counts=(8, 8, 8, 8)):
    return RoundStats(losses=np.asarray(losses, float), gram=np.asarray(gram, float),
                      counts=np.asarray(counts), num_domains=2)


def test_softmax_step_is_exponentiated_gradient():
    w = softmax_step(np.array([0.2, 0.8]), np.array([1.0, 0.0]), 2.0)
    assert w == pytest.approx(np.array([0.2 * np.e ** 2, 0.8]) / (0.2 * np.e ** 2 + 0.8))


def test_grape_alignment_form_by_hand():
    p = MethodParams(mu_domain=1.0, mu_task=1.0, form="alignment", task_smoothing=0.0, floor=0.0)
    upd = METHOD_FNS["grape"](HALF, _stats(), p)
    # task score sum_k alpha_k W_kn / l_n = [1/2, 0.5/4]; z = softmax(log z - score)
    assert upd.diagnostics["task_score"] == pytest.approx([0.5, 0.125])
    assert upd.z == pytest.approx([0.4073334, 0.5926666])      # t1 improves least: it gains weight
    # domain score sum_n z_n W_kn / l_n with the NEW z: [2 z0 / 2, z1 / 4]
    assert upd.diagnostics["alignment"] == pytest.approx([0.4073334, 0.14816665])
    assert upd.alpha == pytest.approx([0.56443145, 0.43556855])


# The research form's rows: d0, d1, t0, t1, then one train-mixture batch e_r per row of E and one
# target-mixture batch c_r per row of C. Gradients as vectors in R^3; the Gram matrix is theirs.
def _research_stats(d, t, e, c, task_losses, target_losses):
    v = np.array([*d, *t, *e, *c], dtype=float)
    losses = np.array([1.0] * len(d) + list(task_losses) + [1.0] * len(e) + list(target_losses))
    return RoundStats(losses=losses, gram=v @ v.T, counts=np.full(len(v), 8), num_domains=len(d),
                      train_batches=len(e), target_batches=len(c))


RESEARCH = _research_stats(d=[(2, 0, 0), (0, 1, 0)], t=[(1, 0, 0), (0, 1, 0)], e=[(4, 0, 0), (0, 0.5, 0)],
                           c=[(3, 0, 0)], task_losses=[1, 2], target_losses=[1.5])


def test_grape_research_form_clips_each_mixture_batch_before_averaging():
    p = MethodParams(mu_domain=1.0, mu_task=1.0, form="research", tau=1.0, task_smoothing=0.0, floor=0.0)
    upd = METHOD_FNS["grape"](HALF, RESEARCH, p)
    # u = mean(clip(e_0), clip(e_1)) = mean((1, 0, 0), (0, 0.5, 0)) = (0.5, 0.25, 0)  [clipping the
    # mean instead, (2, 0.25, 0) / 2.016, would give scores (0.992, 0.031)]
    # h_0 = clip(t_0 / 1) = (1, 0, 0), h_1 = clip(t_1 / 2) = (0, 0.5, 0): scores <h_n, u> = (0.5, 0.125)
    assert upd.diagnostics["task_score"] == pytest.approx([0.5, 0.125])
    assert upd.z == pytest.approx(np.exp([-0.5, -0.125]) / np.exp([-0.5, -0.125]).sum())
    # v = clip(c_0 / l(c_0)) = clip((2, 0, 0)) = (1, 0, 0); clip(d_0) = (1, 0, 0), clip(d_1) = d_1
    assert upd.diagnostics["alignment"] == pytest.approx([1.0, 0.0])
    assert upd.alpha == pytest.approx([np.e / (np.e + 1), 1 / (np.e + 1)])


def test_research_form_needs_its_mixture_batches():
    p = MethodParams(form="research")
    with pytest.raises(ValueError, match="research form needs train-mixture batch rows"):
        METHOD_FNS["grape"](HALF, _stats(), p)


def test_preview_z_is_the_z_the_round_sets():
    """The research form draws its target-mixture batches from the z that the task update gives,
    before the target rows exist: the preview from the first rows equals what the round then sets."""
    c = MixtureController("grape", ["d0", "d1"], ["t0", "t1"], params=MethodParams(form="research", floor=0.0))
    first = RoundStats(losses=RESEARCH.losses[:6], gram=RESEARCH.gram[:6, :6], counts=RESEARCH.counts[:6],
                       num_domains=2, train_batches=2)
    z = c.preview_z(first)
    assert c.z.tolist() == [0.5, 0.5]  # nothing changed
    c.round(10, RESEARCH)
    assert c.z.tolist() == z.tolist()


def test_grape_and_gap_coincide_when_clipping_binds():
    # Research code §4.4: with every norm above tau, clip(g/l) == clip(g), so z moves identically.
    big = _research_stats(d=[(20, 0, 0), (0, 10, 0)], t=[(10, 0, 0), (0, 10, 0)], e=[(40, 0, 0), (0, 5, 5)],
                          c=[(30, 0, 0)], task_losses=[2, 3], target_losses=[1.5])
    p = MethodParams(form="research", tau=1.0, floor=0.0)
    a, b = METHOD_FNS["grape"](HALF, big, p), METHOD_FNS["grape_gap"](HALF, big, p)
    assert a.z == pytest.approx(b.z)
    # ...and they differ without clipping, where the 1/l scaling survives
    q = MethodParams(form="alignment", floor=0.0)
    assert not np.allclose(METHOD_FNS["grape"](HALF, _stats(), q).z, METHOD_FNS["grape_gap"](HALF, _stats(), q).z)


def test_grape_ema_starts_at_first_loss_then_smooths():
    p = MethodParams(form="alignment", ema_beta=0.9, floor=0.0, task_smoothing=0.0)
    first = METHOD_FNS["grape_ema"](HALF, _stats(), p)
    assert first.ema == pytest.approx([2.0, 4.0])
    assert first.z == pytest.approx(METHOD_FNS["grape"](HALF, _stats(), p).z)  # ema == loss at first
    second = METHOD_FNS["grape_ema"]({**HALF, "ema": first.ema}, _stats(losses=[3, 2, 1, 2]), p)
    assert second.ema == pytest.approx([0.9 * 2 + 0.1 * 1, 0.9 * 4 + 0.1 * 2])


def test_doge_moves_alpha_only_and_static_nothing():
    p = MethodParams(form="alignment", floor=0.0)
    upd = METHOD_FNS["doge"]({**HALF, "z": np.array([0.9, 0.1])}, _stats(), p)
    assert upd.z.tolist() == [0.9, 0.1]
    assert upd.alpha[0] > 0.5  # z favours t0, which only d0 helps
    st = METHOD_FNS["static"](HALF, _stats(), p)
    assert st.alpha.tolist() == [0.5, 0.5] and st.z.tolist() == [0.5, 0.5]


def test_unmeasured_unit_gets_a_neutral_score():
    p = MethodParams(form="alignment", floor=0.0)
    upd = METHOD_FNS["doge"](HALF, _stats(counts=(8, 0, 8, 8)), p)
    assert upd.alpha == pytest.approx([0.5, 0.5])  # d1's score := mean of the measured ones


@pytest.mark.parametrize("method", ["grape", "grape_ema", "grape_gap", "doge"])
def test_weights_stay_on_simplex_above_floor_and_recover_from_zero(method):
    rng = np.random.default_rng(0)
    c = MixtureController(method, ["a", "b", "c"], ["x", "y"], alpha0=[1, 0, 0],
                          params=MethodParams(mu_domain=50, mu_task=50, floor=1e-3))
    assert c.alpha.min() >= 1e-3 - 1e-12
    for step in range(1, 30):
        m = rng.normal(size=(7, 20))  # a, b, c, x, y, one train- and one target-mixture batch
        m[1] += 3 * (m[3] + m[4])  # domain b helps both tasks
        m[6] += m[3] + m[4]        # the target mixture holds both tasks
        gram = m @ m.T
        c.round(step, RoundStats(losses=rng.uniform(1, 5, 7), gram=gram, counts=np.ones(7), num_domains=3,
                                 train_batches=1, target_batches=1))
        assert c.alpha.sum() == pytest.approx(1) and c.z.sum() == pytest.approx(1)
        assert c.alpha.min() >= 1e-3 * 0.99 and np.all(np.isfinite(c.alpha)) and np.all(np.isfinite(c.z))
    assert c.alpha[1] > 0.5  # b started at zero and came back


def test_non_finite_round_is_skipped_with_a_warning(caplog):
    c = MixtureController("grape", ["a", "b"], ["x", "y"])
    bad = G.copy()
    bad[0, 2] = np.nan
    with caplog.at_level("WARNING"):
        assert c.round(10, _stats(bad)) is False
    assert "skipped" in caplog.text and c.alpha.tolist() == [0.5, 0.5] and c.summary()["skipped_rounds"] == 1
    assert c.round(20, _stats(losses=[1, 1, np.inf, 1])) is False


def test_static_stays_exactly_put_and_state_is_json():
    c = MixtureController("static", ["a", "b", "c"], ["t0", "t1"], alpha0=[1, 1, 2])
    start = c.alpha.copy()
    for step in (10, 20, 30):
        assert c.round(step) is False
    assert np.array_equal(c.alpha, start) and np.allclose(c.alpha, [0.25, 0.25, 0.5])
    assert np.allclose(c.z, [0.5, 0.5]) and np.array_equal(c.alpha_avg, start)
    assert len(c.summary()["history"]) == 1


def test_averages_history_and_state_round_trip():
    c = MixtureController("grape", ["a", "b"], ["x", "y"], params=MethodParams(form="alignment", floor=0.0))
    c.round(10, _stats())
    c.round(20, _stats())
    hist = c.summary()["history"]
    assert [h["step"] for h in hist] == [0, 10, 20]
    assert c.alpha_avg == pytest.approx((np.array(hist[1]["alpha"]) + hist[2]["alpha"]) / 2)
    state = json.loads(json.dumps(c.state_dict()))
    d = MixtureController("grape", ["a", "b"], ["x", "y"], params=MethodParams(form="alignment", floor=0.0))
    d.load_state_dict(state)
    assert d.summary() == c.summary()
    c.round(30, _stats())
    d.round(30, _stats())
    assert d.alpha.tolist() == c.alpha.tolist()


def test_weights_near_the_float_limit_are_normalised_without_overflow():
    c = MixtureController("static", list("abcdef"), ["t"], alpha0=[1e308, 1e308, 1, 1, 1, 1])
    assert np.all(np.isfinite(c.alpha)) and c.alpha[:2] == pytest.approx([0.5, 0.5])
    g = MixtureController("grape", list("abc"), ["t"], alpha0=[1e308, 1e308, 1], params=MethodParams(floor=1e-3))
    assert np.all(np.isfinite(g.alpha)) and g.alpha.min() >= 1e-3 - 1e-12


def test_unknown_method_and_foreign_state():
    with pytest.raises(ValueError, match=r"unknown mixture method 'nope'.*static"):
        MixtureController("nope", ["a"], [])
    c = MixtureController("static", ["a", "b"], [])
    with pytest.raises(ValueError, match="domains"):
        MixtureController("static", ["a", "c"], []).load_state_dict(c.state_dict())
