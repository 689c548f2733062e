"""MixtureSampler: draws are a pure function of (seed, rank, step, micro_step, weights)."""

import numpy as np
import pytest

from grape_ds.data.sampler import MixtureSampler, mixture_probabilities

SIZES = [50, 80, 120, 30]


def _sampler(rank=0, weights=(1, 1, 1, 1), mode="domain_pure", seed=7, mb=8):
    return MixtureSampler(SIZES, weights, seed=seed, rank=rank, micro_batch_size=mb,
                          mode=mode, data_hash="h")


def _stream(s, steps=20, gas=2):
    return [s.draw(t, m) for t in range(steps) for m in range(gas)]


@pytest.mark.parametrize("mode", ["domain_pure", "mixed"])
def test_same_seed_same_draws_and_ranks_differ(mode):
    a, b = _stream(_sampler(mode=mode)), _stream(_sampler(mode=mode))
    assert all(np.array_equal(x.domains, y.domains) and np.array_equal(x.windows, y.windows) for x, y in zip(a, b))
    other = _stream(_sampler(rank=1, mode=mode))
    same = sum(np.array_equal(x.windows, y.windows) and np.array_equal(x.domains, y.domains) for x, y in zip(a, other))
    assert same == 0
    assert _stream(_sampler(seed=8, mode=mode))[0].windows.tolist() != a[0].windows.tolist()


def test_draw_is_pure_function_of_position_not_history():
    s = _sampler()
    later = s.draw(13, 1)
    fresh = _sampler()
    _stream(fresh, steps=13)  # history before the draw changes nothing
    again = fresh.draw(13, 1)
    assert np.array_equal(later.windows, again.windows) and np.array_equal(later.domains, again.domains)


def test_domain_pure_batches_hold_one_domain_and_windows_are_in_range():
    for d in _stream(_sampler(), steps=50):
        assert d.pure_domain is not None
        assert np.all(d.windows < np.asarray(SIZES)[d.domains]) and np.all(d.windows >= 0)
    mixed = _stream(_sampler(mode="mixed"), steps=50)
    assert any(d.pure_domain is None for d in mixed)


@pytest.mark.parametrize("mode", ["domain_pure", "mixed"])
def test_realised_shares_converge_to_weights(mode):
    w = np.array([0.1, 0.2, 0.3, 0.4])
    s = _sampler(weights=w, mode=mode)
    _stream(s, steps=3000 if mode == "domain_pure" else 500)
    counts = s.realised.take()
    assert np.abs(counts / counts.sum() - w).max() < 0.02
    assert s.realised.take().sum() == 0  # taken


def test_set_weights_takes_effect_at_next_draw():
    s = _sampler()
    s.set_weights([0, 0, 1, 0])
    assert all(d.pure_domain == 2 for d in _stream(s, steps=30))
    s.set_weights([1, 0, 0, 0])
    assert s.draw(30, 0).pure_domain == 0


def test_weights_are_drawn_exactly_and_zero_means_never():
    """No floor in the sampler (the controller keeps adaptive weights above it): what is reported is
    what is drawn, and a static weight of 0 is never drawn."""
    s = _sampler(weights=[0, 1, 1, 2], mode="mixed")
    assert s.probs.tolist() == [0.0, 0.25, 0.25, 0.5]
    _stream(s, steps=2000)
    counts = s.realised.take()
    shares = counts / counts.sum()
    assert shares[0] == 0 and shares[1:] == pytest.approx([0.25, 0.25, 0.5], abs=0.01)


def test_weights_are_validated_and_normalised_without_overflow():
    with pytest.raises(ValueError, match="not all zero"):
        mixture_probabilities([0, 0])
    with pytest.raises(ValueError, match="finite"):
        mixture_probabilities([1, float("inf")])
    assert mixture_probabilities([1e308, 1e308, 1, 1]).tolist() == pytest.approx([0.5, 0.5, 0, 0])
    with pytest.raises(ValueError, match="3 weights for 4 domains"):
        _sampler().set_weights([1, 1, 1])


def test_state_round_trip_and_hash_check():
    s = _sampler(weights=[1, 2, 3, 4])
    state = s.state_dict()
    t = _sampler()
    t.load_state_dict(state)
    assert np.array_equal(t.draw(5, 0).windows, s.draw(5, 0).windows)
    u = MixtureSampler(SIZES, [1] * 4, seed=7, rank=0, micro_batch_size=8, data_hash="other")
    with pytest.raises(ValueError, match="packed data"):
        u.load_state_dict(state)


def test_realised_counts_are_the_samplers_own_per_rank_state():
    """The counts a checkpoint carries per rank round-trip; a bare array (earlier grape-ds) loads too."""
    s = _sampler(mode="mixed")
    _stream(s, steps=5)
    state = s.realised.state_dict()
    t = _sampler(mode="mixed")
    t.realised.load_state_dict(state)
    assert t.realised.counts.tolist() == s.realised.counts.tolist() and s.realised.counts.sum() > 0
    u = _sampler(mode="mixed")
    u.realised.load_state_dict(state["counts"])
    assert u.realised.take().tolist() == state["counts"].tolist()
