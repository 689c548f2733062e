"""Learning-rate schedules as pure functions of the optimizer step, and the one periodic test
(:func:`is_due`) that every "every N steps" key (rounds, evaluation, checkpoints, logging) uses.

Formulas from ``reference/ALGORITHMS.md`` §5.2 (the research code's ``src/schedulers.py``):
W warm-up steps, T total steps, ``lr`` peak, ``lr_end`` final, warm-up starts at ``LR_START`` = 1e-7,
and past T the rate stays at its value for T. A schedule keeps no state but the step, so resuming
needs nothing beyond the step counter.
"""

from __future__ import annotations

import math
from typing import Callable

__all__ = ["LR_START", "SCHEDULES", "lr_at", "lr_multiplier_fn", "is_due"]

LR_START = 1e-7


def is_due(step: int, every: int) -> bool:
    """Whether optimizer step ``step`` (counted from 1) is the turn of something done every ``every``
    steps: after steps ``every, 2 * every, ...``; never when ``every <= 0`` (the config's "off")."""
    return every > 0 and step % every == 0


def _warmup(t: int, warmup: int, lr: float) -> float:
    return LR_START + (lr - LR_START) * t / warmup


def linear_warmup_cosine(t: int, *, lr: float, lr_end: float, warmup: int, total: int,
                         decay_rate: float = 0.1) -> float:
    if t < warmup:
        return _warmup(t, warmup, lr)
    t = min(t, total)
    return lr_end + 0.5 * (lr - lr_end) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def linear_warmup_exponential(t: int, *, lr: float, lr_end: float, warmup: int, total: int,
                              decay_rate: float = 0.1) -> float:
    if t < warmup:
        return _warmup(t, warmup, lr)
    t = min(t, total)
    gamma = (1e-10 / abs(lr - lr_end)) ** (1.0 / (total - warmup))
    return lr_end + (lr - lr_end) * gamma ** (t - warmup)


def linear_warmup_decay(t: int, *, lr: float, lr_end: float, warmup: int, total: int,
                        decay_rate: float = 0.1) -> float:
    """Warmup-stable-decay: constant after warm-up, then linear to ``lr_end`` over the last D steps."""
    if t < warmup:
        return _warmup(t, warmup, lr)
    t = min(t, total)
    decay = max(1, math.floor(decay_rate * total))
    if t < total - decay:
        return lr
    return lr_end + (lr - lr_end) * (total - t) / decay


SCHEDULES: dict[str, Callable[..., float]] = {
    "linear_warmup_cosine": linear_warmup_cosine,
    "linear_warmup_exponential": linear_warmup_exponential,
    "linear_warmup_decay": linear_warmup_decay,
}


def lr_at(name: str, t: int, *, lr: float, lr_end: float, warmup: int, total: int,
          decay_rate: float = 0.1) -> float:
    """Learning rate at optimizer step ``t`` (0-based: the rate used by the (t+1)-th update)."""
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown LR schedule {name!r}; choose from {sorted(SCHEDULES)}") from None
    return fn(t, lr=lr, lr_end=lr_end, warmup=warmup, total=total, decay_rate=decay_rate)


def lr_multiplier_fn(name: str, *, lr: float, lr_end: float, warmup: int, total: int,
                     decay_rate: float = 0.1) -> Callable[[int], float]:
    """``step -> lr_at(step) / lr``, the form ``torch.optim.lr_scheduler.LambdaLR`` takes."""
    return lambda t: lr_at(name, t, lr=lr, lr_end=lr_end, warmup=warmup, total=total,
                           decay_rate=decay_rate) / lr
