"""MixtureController bookkeeping (the methods themselves are pure functions)."""

import json

import numpy as np
import pytest

from grape_ds.controller import MixtureController


def test_static_stays_exactly_put_and_state_is_json():
    c = MixtureController("static", ["a", "b", "c"], ["t0", "t1"], alpha0=[1, 1, 2])
    start = c.alpha.copy()
    for step in (10, 20, 30):
        assert c.round(step) is False
    assert np.array_equal(c.alpha, start) and np.allclose(c.alpha, [0.25, 0.25, 0.5])
    assert np.allclose(c.z, [0.5, 0.5]) and np.array_equal(c.alpha_avg, start)
    assert len(c.summary()["history"]) == 1
    state = json.loads(json.dumps(c.state_dict()))
    d = MixtureController("static", ["a", "b", "c"], ["t0", "t1"])
    d.load_state_dict(state)
    assert d.summary() == c.summary()


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown mixture method 'nope'.*static"):
        MixtureController("nope", ["a"], [])


def test_state_from_other_domains_is_refused():
    c = MixtureController("static", ["a", "b"], [])
    with pytest.raises(ValueError, match="domains"):
        MixtureController("static", ["a", "c"], []).load_state_dict(c.state_dict())
