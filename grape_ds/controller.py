"""The mixture controller: domain weights alpha and task weights z, their averages and history.

It runs on global rank 0; the train loop broadcasts its weights to every rank's sampler. A method is a
pure function ``(state, stats, config) -> (alpha, z)`` registered by name in :data:`METHOD_FNS`; the
controller keeps the last weights, the running sums behind the averaged weights, and the history of
every round. Its whole state is a small JSON-serialisable dict that lives in the checkpoint.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

__all__ = ["MixtureController", "METHOD_FNS", "static_update"]

log = logging.getLogger(__name__)


def static_update(alpha: np.ndarray, z: np.ndarray, stats, cfg) -> tuple[np.ndarray, np.ndarray]:
    """``static``: the weights never move (uniform, or a given vector such as CRISP/RegMix/CLIMB)."""
    return alpha, z


METHOD_FNS: dict[str, Callable] = {"static": static_update}


def _normalise(w, n: int) -> np.ndarray:
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum()


class MixtureController:
    """Holds alpha [K] and z [N] and applies the configured method once per round."""

    def __init__(self, method: str, domains: list[str], tasks: list[str], alpha0=None, z0=None,
                 method_cfg=None) -> None:
        if method not in METHOD_FNS:
            raise ValueError(f"unknown mixture method {method!r}; choose from {sorted(METHOD_FNS)}")
        self.method, self.domains, self.tasks, self.method_cfg = method, list(domains), list(tasks), method_cfg
        self.alpha = _normalise(alpha0, len(domains))  # [K]
        self.z = _normalise(z0, max(1, len(tasks)))[: len(tasks)] if tasks else np.zeros(0)  # [N]
        self.alpha_sum, self.z_sum, self.rounds = self.alpha.copy(), self.z.copy(), 1
        self.history: list[dict] = [self._entry(0)]

    def _entry(self, step: int) -> dict:
        return {"step": int(step), "alpha": self.alpha.tolist(), "z": self.z.tolist()}

    @property
    def alpha_avg(self) -> np.ndarray:
        return self.alpha_sum / self.rounds

    @property
    def z_avg(self) -> np.ndarray:
        return self.z_sum / self.rounds

    def round(self, step: int, stats=None) -> bool:
        """Apply the method after optimizer step ``step``; returns whether the weights changed."""
        alpha, z = METHOD_FNS[self.method](self.alpha, self.z, stats, self.method_cfg)
        changed = not (np.array_equal(alpha, self.alpha) and np.array_equal(z, self.z))
        self.alpha, self.z = np.asarray(alpha, dtype=np.float64), np.asarray(z, dtype=np.float64)
        self.alpha_sum += self.alpha
        self.z_sum += self.z
        self.rounds += 1
        if changed:
            self.history.append(self._entry(step))
        return changed

    def summary(self) -> dict:
        """What ``mixture.json`` holds."""
        return {"method": self.method, "domains": self.domains, "tasks": self.tasks,
                "alpha": self.alpha.tolist(), "alpha_avg": self.alpha_avg.tolist(),
                "z": self.z.tolist(), "z_avg": self.z_avg.tolist(), "rounds": self.rounds - 1,
                "history": self.history}

    def state_dict(self) -> dict:
        return {"method": self.method, "domains": self.domains, "tasks": self.tasks,
                "alpha": self.alpha.tolist(), "z": self.z.tolist(), "alpha_sum": self.alpha_sum.tolist(),
                "z_sum": self.z_sum.tolist(), "rounds": self.rounds, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        if state["domains"] != self.domains or state["tasks"] != self.tasks:
            raise ValueError(f"checkpoint mixes domains {state['domains']} / tasks {state['tasks']}, "
                             f"this run has {self.domains} / {self.tasks}")
        if state["method"] != self.method:
            log.warning("resuming a %s run's weights with method %s", state["method"], self.method)
        self.alpha, self.z = np.asarray(state["alpha"]), np.asarray(state["z"])
        self.alpha_sum, self.z_sum = np.asarray(state["alpha_sum"]), np.asarray(state["z_sum"])
        self.rounds, self.history = int(state["rounds"]), list(state["history"])
