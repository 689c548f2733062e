"""LR schedules against their formulas (ALGORITHMS.md §5.2) at several steps."""

import math

import pytest

from grape_ds.schedules import LR_START, lr_at, lr_multiplier_fn

LR, END, W, T = 1e-3, 1e-4, 10, 110


@pytest.mark.parametrize("name", ["linear_warmup_cosine", "linear_warmup_exponential", "linear_warmup_decay"])
def test_warmup_is_linear_from_1e_7(name):
    assert lr_at(name, 0, lr=LR, lr_end=END, warmup=W, total=T) == pytest.approx(LR_START)
    assert lr_at(name, 5, lr=LR, lr_end=END, warmup=W, total=T) == pytest.approx(LR_START + (LR - LR_START) * 0.5)
    assert lr_at(name, W, lr=LR, lr_end=END, warmup=W, total=T) == pytest.approx(LR)


def test_cosine():
    f = lambda t: lr_at("linear_warmup_cosine", t, lr=LR, lr_end=END, warmup=W, total=T)
    assert f(60) == pytest.approx(END + 0.5 * (LR - END) * (1 + math.cos(math.pi * 0.5)))
    assert f(35) == pytest.approx(END + 0.5 * (LR - END) * (1 + math.cos(math.pi * 25 / 100)))
    assert f(T) == pytest.approx(END)
    assert f(T + 50) == f(T)  # frozen past the horizon


def test_exponential():
    f = lambda t: lr_at("linear_warmup_exponential", t, lr=LR, lr_end=END, warmup=W, total=T)
    gamma = (1e-10 / (LR - END)) ** (1 / (T - W))
    assert f(40) == pytest.approx(END + (LR - END) * gamma ** 30)
    assert f(T) == pytest.approx(END + 1e-10)
    assert f(T + 1) == f(T)


def test_warmup_stable_decay():
    f = lambda t: lr_at("linear_warmup_decay", t, lr=LR, lr_end=END, warmup=W, total=T, decay_rate=0.2)
    d = math.floor(0.2 * T)  # 22 decay steps
    assert f(50) == LR and f(T - d - 1) == LR
    assert f(T - d) == pytest.approx(LR)
    assert f(T - 11) == pytest.approx(END + (LR - END) * 11 / d)
    assert f(T) == pytest.approx(END)


def test_multiplier_is_rate_over_peak_and_unknown_name_errors():
    m = lr_multiplier_fn("linear_warmup_cosine", lr=LR, lr_end=END, warmup=W, total=T)
    assert m(60) * LR == pytest.approx(lr_at("linear_warmup_cosine", 60, lr=LR, lr_end=END, warmup=W, total=T))
    with pytest.raises(ValueError, match="unknown LR schedule 'step'"):
        lr_at("step", 1, lr=LR, lr_end=END, warmup=W, total=T)
