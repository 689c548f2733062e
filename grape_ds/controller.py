"""The mixture controller: domain weights alpha, task weights z, their averages and their history.

It runs on global rank 0; the train loop broadcasts its weights to every rank's sampler. Each method
is a pure function ``(state, stats, params) -> Update`` registered by name in :data:`METHOD_FNS`,
where ``stats`` holds one round's per-unit losses and the Gram matrix of the globally reduced unit
gradients (``reference/ALGORITHMS.md`` §9.1: every rule needs only these). The controller keeps the
last weights, the running sums behind the averaged weights and the history of every round; its whole
state is a small JSON-serialisable dict that lives in the checkpoint.

Units are ordered domains first, then tasks: ``gram[:K, :K]`` is domain x domain, ``gram[:K, K:]``
the alignment matrix W (domain x task), ``gram[K:, K:]`` task x task.

Two estimator forms (``params.form``):

* ``research``: the research code's estimators, expressed on the Gram matrix (§4.1-§4.4): every unit
  gradient clipped to norm ``tau``; the z update's train direction is the clipped alpha-mixture
  gradient; the alpha update's target direction is the clipped gradient of the (log) pooled z-mixture
  target loss; z is smoothed with ``task_smoothing`` (the code hard-codes 0.001).
* ``alignment``: the explicit alignment-matrix form of §4.10, no clipping:
  ``z <- softmax(log z - mu_task * sum_k alpha_k W_kn / l_n)`` then
  ``alpha <- softmax(log alpha + mu_domain * sum_n z_n W_kn / l_n)``.

Unlike the research code, alpha never reaches zero (``floor``), so every domain can recover.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["MixtureController", "METHOD_FNS", "METHODS", "RoundStats", "MethodParams", "Update",
           "softmax_step"]

log = logging.getLogger(__name__)

_TINY = 1e-30  # keeps log(w) finite


@dataclass(frozen=True)
class RoundStats:
    """One round's measurements, reduced over all ranks."""
    losses: np.ndarray      # [U] mean loss per unit (domains, then tasks)
    gram: np.ndarray        # [U, U] dot products of the reduced unit gradients
    counts: np.ndarray      # [U] sequences behind each unit; 0 = not measured this round
    num_domains: int


@dataclass(frozen=True)
class MethodParams:
    mu_domain: float = 1.5          # step on alpha
    mu_task: float = 5.0            # step on z
    form: str = "research"          # "research" or "alignment"
    tau: float | None = 1.0         # per-unit clip (research form); None: no clipping
    task_smoothing: float = 1e-3    # z <- (1 - s) z + s / N after each task update
    ema_beta: float = 0.9           # grape_ema's loss EMA
    floor: float = 1e-3             # alpha never goes below this


@dataclass
class Update:
    alpha: np.ndarray
    z: np.ndarray
    ema: list | None = None
    diagnostics: dict = field(default_factory=dict)


def softmax_step(w: np.ndarray, score: np.ndarray, step: float) -> np.ndarray:
    """Exponentiated-gradient step: ``softmax(log w + step * score)`` (a zero step is the identity)."""
    if step == 0:
        return w
    logits = np.log(np.maximum(w, _TINY)) + step * score
    logits -= logits.max()
    e = np.exp(logits)
    return e / e.sum()


def _apply_floor(w: np.ndarray, floor: float) -> np.ndarray:
    """The simplex point closest in ratio to ``w`` with every entry >= ``floor``: entries below the
    floor are raised to it, the others share the rest in their proportions."""
    w = np.asarray(w, dtype=np.float64)
    if abs(w.sum() - 1) < 1e-12 and w.min() >= floor:
        return w  # already feasible: keep it bit for bit
    w = w / w.sum()
    if floor <= 0:
        return w
    low = np.zeros(len(w), dtype=bool)
    while True:
        free = w[~low].sum()
        out = np.where(low, floor, w * (1 - floor * low.sum()) / free if free > 0 else 0.0)
        newly = (out < floor) & ~low
        if not newly.any():
            return out
        low |= newly


def _clip_scale(norm: np.ndarray, tau: float | None) -> np.ndarray:
    """``min(1, tau / norm)`` elementwise (1 where tau is None or the norm is 0)."""
    norm = np.asarray(norm, dtype=np.float64)
    if tau is None:
        return np.ones_like(norm)
    return np.minimum(1.0, tau / np.maximum(norm, _TINY))


def _fill_missing(score: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Units measured by no rank this round get the mean score of the others (a neutral move)."""
    if present.all() or not present.any():
        return np.where(present, score, 0.0)
    return np.where(present, score, score[present].mean())


def _task_scale(variant: str, losses_t: np.ndarray, norms_t: np.ndarray, ema: np.ndarray | None,
                p: MethodParams) -> np.ndarray:
    """Per-task factor s_n with h_n = s_n * g_n: log-loss (grape), EMA-normalised, or raw (gap)."""
    if p.form == "alignment":
        if variant == "grape_gap":
            return np.ones_like(losses_t)
        return 1.0 / (ema if variant == "grape_ema" else losses_t)
    if variant == "grape_ema":  # clip first, then divide by the EMA
        return _clip_scale(norms_t, p.tau) / ema
    if variant == "grape_gap":
        return _clip_scale(norms_t, p.tau)
    # grape: clip(grad log l_n) = clip(g_n / l_n)
    return _clip_scale(norms_t / losses_t, p.tau) / losses_t


def _task_update(variant: str, alpha, z, stats: RoundStats, ema, p: MethodParams):
    k, g, losses = stats.num_domains, stats.gram, stats.losses
    w = g[:k, k:]                                   # [K, N] alignment matrix
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))    # [U]
    scale_t = _task_scale(variant, losses[k:], norms[k:], ema, p)  # [N]
    if p.form == "alignment":
        train_dir = alpha @ w                       # [N]  <sum_k alpha_k g_k, g_n>
    else:
        # u = clip(sum_k alpha_k g_k): its norm from the domain block of the Gram matrix
        u_norm = np.sqrt(max(float(alpha @ g[:k, :k] @ alpha), 0.0))
        train_dir = _clip_scale(u_norm, p.tau) * (alpha @ w)
    score = _fill_missing(scale_t * train_dir, stats.counts[k:] > 0)  # [N] <h_n, u>
    z_new = softmax_step(z, score, -p.mu_task)
    z_new = (1 - p.task_smoothing) * z_new + p.task_smoothing / len(z_new)
    return z_new, score


def _domain_update(variant: str, alpha, z, stats: RoundStats, ema, p: MethodParams):
    k, g, losses = stats.num_domains, stats.gram, stats.losses
    w = g[:k, k:]                                   # [K, N]
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    log_target = variant != "grape_gap"
    if p.form == "alignment":
        denom = (ema if variant == "grape_ema" else losses[k:]) if log_target else np.ones(len(z))
        score = w @ (z / denom)                     # [K] sum_n z_n W_kn / l_n
    else:
        # v = clip(grad phi(pooled z-mixture loss)); phi = log divides by the pooled loss
        a = 1.0 / float(z @ losses[k:]) if log_target else 1.0
        v_norm = a * np.sqrt(max(float(z @ g[k:, k:] @ z), 0.0))
        score = _clip_scale(norms[:k], p.tau) * _clip_scale(v_norm, p.tau) * a * (w @ z)
    score = _fill_missing(score, stats.counts[:k] > 0)
    return _apply_floor(softmax_step(alpha, score, p.mu_domain), p.floor), score


def _update_ema(ema, losses_t: np.ndarray, beta: float) -> np.ndarray:
    if ema is None:
        return losses_t.copy()                      # starts at the first observed loss
    return beta * np.asarray(ema) + (1 - beta) * losses_t


def _grape_family(variant: str) -> Callable:
    def method(state: dict, stats: RoundStats, p: MethodParams) -> Update:
        alpha, z = np.asarray(state["alpha"]), np.asarray(state["z"])
        k = stats.num_domains
        ema = _update_ema(state.get("ema"), stats.losses[k:], p.ema_beta)  # updated before use
        z_new, task_score = _task_update(variant, alpha, z, stats, ema, p)  # task first (GRAPE order)
        alpha_new, domain_score = _domain_update(variant, alpha, z_new, stats, ema, p)
        return Update(alpha_new, z_new, ema.tolist(),
                      {"alignment": domain_score.tolist(), "task_score": task_score.tolist()})
    method.__name__ = variant
    method.__doc__ = f"``{variant}``: task weights by exponentiated gradient on the train alignment, " \
                     "then domain weights toward the z-weighted target direction."
    return method


def doge(state: dict, stats: RoundStats, p: MethodParams) -> Update:
    """``doge``: domain update only (log-loss target side, as the research configs run it); z frozen."""
    alpha, z = np.asarray(state["alpha"]), np.asarray(state["z"])
    k = stats.num_domains
    ema = _update_ema(state.get("ema"), stats.losses[k:], p.ema_beta)
    alpha_new, score = _domain_update("grape", alpha, z, stats, ema, p)
    return Update(alpha_new, z, ema.tolist(), {"alignment": score.tolist()})


def static(state: dict, stats: RoundStats, p: MethodParams) -> Update:
    """``static``: the weights never move (uniform, or a given vector such as CRISP/RegMix/CLIMB)."""
    return Update(np.asarray(state["alpha"]), np.asarray(state["z"]), state.get("ema"))


METHOD_FNS: dict[str, Callable[[dict, RoundStats, MethodParams], Update]] = {
    "static": static,
    "grape": _grape_family("grape"),
    "grape_ema": _grape_family("grape_ema"),
    "grape_gap": _grape_family("grape_gap"),
    "doge": doge,
}
METHODS = tuple(METHOD_FNS)


def _normalise(w, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0)
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum()


class MixtureController:
    """Holds alpha [K] and z [N] and applies the configured method once per round."""

    def __init__(self, method: str, domains: list[str], tasks: list[str], alpha0=None, z0=None,
                 params: MethodParams | None = None) -> None:
        if method not in METHOD_FNS:
            raise ValueError(f"unknown mixture method {method!r}; choose from {sorted(METHOD_FNS)}")
        self.method, self.domains, self.tasks = method, list(domains), list(tasks)
        self.params = params or MethodParams()
        floor = self.params.floor if method != "static" else 0.0
        self.alpha = _apply_floor(_normalise(alpha0, len(domains)), floor)  # [K]
        self.z = _normalise(z0, len(tasks))                                  # [N]
        self.ema: list | None = None
        self.alpha_sum, self.z_sum, self.rounds = np.zeros(len(domains)), np.zeros(len(tasks)), 0
        self.skipped = 0
        self.history: list[dict] = [self._entry(0)]
        self.last_diagnostics: dict = {}

    def _entry(self, step: int) -> dict:
        return {"step": int(step), "alpha": self.alpha.tolist(), "z": self.z.tolist()}

    @property
    def alpha_avg(self) -> np.ndarray:
        """Mean of alpha over rounds (the initial alpha before the first round)."""
        return self.alpha_sum / self.rounds if self.rounds else self.alpha.copy()

    @property
    def z_avg(self) -> np.ndarray:
        return self.z_sum / self.rounds if self.rounds else self.z.copy()

    def round(self, step: int, stats: RoundStats | None = None) -> bool:
        """Apply the method after optimizer step ``step``; returns whether the weights changed.

        A round whose losses or Gram entries are not finite is skipped with a warning."""
        if self.method == "static":
            return False
        if stats is None:
            raise ValueError(f"method {self.method!r} needs round statistics")
        if not (np.all(np.isfinite(stats.losses)) and np.all(np.isfinite(stats.gram))):
            self.skipped += 1
            log.warning("round at step %d skipped: non-finite unit loss or Gram entry (losses %s)",
                        step, np.round(stats.losses, 4).tolist())
            return False
        state = {"alpha": self.alpha, "z": self.z, "ema": self.ema}
        upd = METHOD_FNS[self.method](state, stats, self.params)
        if not (np.all(np.isfinite(upd.alpha)) and np.all(np.isfinite(upd.z))):
            self.skipped += 1
            log.warning("round at step %d skipped: the update produced non-finite weights", step)
            return False
        self.alpha, self.z, self.ema = upd.alpha, upd.z, upd.ema
        self.alpha_sum += self.alpha
        self.z_sum += self.z
        self.rounds += 1
        self.last_diagnostics = upd.diagnostics
        self.history.append(self._entry(step))
        return True

    def summary(self) -> dict:
        """What ``mixture.json`` holds."""
        return {"method": self.method, "domains": self.domains, "tasks": self.tasks,
                "alpha": self.alpha.tolist(), "alpha_avg": self.alpha_avg.tolist(),
                "z": self.z.tolist(), "z_avg": self.z_avg.tolist(), "rounds": self.rounds,
                "skipped_rounds": self.skipped, "history": self.history}

    def state_dict(self, history: bool = True) -> dict:
        """The whole state (JSON-serialisable). ``history=False`` leaves out the per-round history,
        which is what the broadcast to other ranks needs (only rank 0 writes it out)."""
        state = {"method": self.method, "domains": self.domains, "tasks": self.tasks,
                 "alpha": self.alpha.tolist(), "z": self.z.tolist(), "ema": self.ema,
                 "alpha_sum": self.alpha_sum.tolist(), "z_sum": self.z_sum.tolist(),
                 "rounds": self.rounds, "skipped": self.skipped}
        if history:
            state["history"] = self.history
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["domains"] != self.domains or state["tasks"] != self.tasks:
            raise ValueError(f"checkpoint has domains {state['domains']} / tasks {state['tasks']}, "
                             f"this run has {self.domains} / {self.tasks}")
        if state["method"] != self.method:
            log.warning("resuming a %s run's weights with method %s", state["method"], self.method)
        self.alpha, self.z = np.asarray(state["alpha"]), np.asarray(state["z"])
        self.alpha_sum, self.z_sum = np.asarray(state["alpha_sum"]), np.asarray(state["z_sum"])
        self.ema, self.rounds, self.skipped = state.get("ema"), int(state["rounds"]), int(state.get("skipped", 0))
        if "history" in state:
            self.history = list(state["history"])
