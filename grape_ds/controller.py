"""The mixture controller: domain weights alpha, task weights z, their averages and their history.

It runs on global rank 0; the train loop broadcasts its weights to every rank's sampler. Each method
is a pure function ``(state, stats, params) -> Update`` registered by name in :data:`METHOD_FNS`,
where ``stats`` holds one round's per-unit losses and the Gram matrix of the globally reduced unit
gradients (``reference/ALGORITHMS.md`` §9.1: every rule needs only these). The controller keeps the
last weights, the running sums behind the averaged weights and the history of every round; its whole
state is a small JSON-serialisable dict that lives in the checkpoint.

Rows of the Gram matrix (:class:`RoundStats`): the K domains, the N tasks, then (research form only)
``train_batches`` train-mixture batches ``e_r`` (drawn from alpha) and ``target_batches``
target-mixture batches ``c_r`` (drawn from z, after the task update: GRAPE's order). ``W = gram[:K,
K:K+N]`` is the alignment matrix (domain x task).

Two estimator forms (``params.form``):

* ``research``: the research code's estimators exactly (§2.4, §4.1-§4.4), every gradient clipped to
  norm ``tau`` on its own before anything is averaged:

  - task update: ``u = mean_r clip(e_r)`` (one clip per train-mixture batch), ``h_n = clip(g_n /
    l_n)`` (``grape``), ``clip(g_n) / ema_n`` (``grape_ema``) or ``clip(g_n)`` (``grape_gap``);
    ``z <- softmax(log z - mu_task <h_n, u>)``, then smoothed with ``task_smoothing`` (the code
    hard-codes 0.001);
  - domain update: ``v = mean_r clip(grad phi(l(c_r)))`` with ``phi = log`` (``grape``,
    ``grape_ema``, ``doge``) or the identity (``grape_gap``), so a batch's log-loss gradient is
    ``c_r / l(c_r)`` clipped as a whole; ``g_k`` clipped; ``alpha <- softmax(log alpha + mu_domain
    <clip(g_k), v>)``.
* ``alignment``: the explicit alignment-matrix form of §4.10, no clipping and no mixture batches:
  ``z <- softmax(log z - mu_task * sum_k alpha_k W_kn / l_n)`` then
  ``alpha <- softmax(log alpha + mu_domain * sum_n z_n W_kn / l_n)``.

Unlike the research code, an adaptive method's alpha never goes below ``floor``, so every domain can
recover; the floor is applied here only, and the samplers draw alpha exactly as reported. A static
mixture has no floor: a weight of 0 is never drawn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from grape_ds.config import MixtureConfig, ProbeConfig

__all__ = ["MixtureController", "METHOD_FNS", "METHODS", "UPDATES_TASKS", "RoundStats", "MethodParams",
           "Update", "softmax_step", "mixture_batch_rows"]

log = logging.getLogger(__name__)

_TINY = 1e-30  # keeps log(w) finite


@dataclass(frozen=True)
class RoundStats:
    """One round's measurements, reduced over all ranks. Rows: domains, tasks, train-mixture
    batches, target-mixture batches (the last two in the research form only)."""
    losses: np.ndarray      # [U] mean loss per row
    gram: np.ndarray        # [U, U] dot products of the reduced gradients
    counts: np.ndarray      # [U] sequences behind each row; 0 = not measured this round
    num_domains: int
    train_batches: int = 0   # e_r rows after the tasks
    target_batches: int = 0  # c_r rows after those

    @property
    def num_tasks(self) -> int:
        return len(self.losses) - self.num_domains - self.train_batches - self.target_batches

    def rows(self, part: str) -> slice:
        """The rows of ``"domains"``, ``"tasks"``, ``"train_batches"`` or ``"target_batches"``."""
        k, n, e = self.num_domains, self.num_tasks, self.train_batches
        return {"domains": slice(0, k), "tasks": slice(k, k + n), "train_batches": slice(k + n, k + n + e),
                "target_batches": slice(k + n + e, len(self.losses))}[part]


@dataclass(frozen=True)
class MethodParams:
    mu_domain: float = 1.5          # step on alpha
    mu_task: float = 5.0            # step on z
    form: str = "research"          # "research" or "alignment"
    tau: float | None = 1.0         # per-unit clip (research form); None: no clipping
    task_smoothing: float = 1e-3    # z <- (1 - s) z + s / N after each task update
    ema_beta: float = 0.9           # grape_ema's loss EMA
    floor: float = 1e-3             # alpha never goes below this

    @classmethod
    def from_config(cls, m: MixtureConfig) -> "MethodParams":
        """The update rules' hyperparameters of the ``mixture:`` section (``unit_clip`` is ``tau``)."""
        return cls(mu_domain=m.mu_domain, mu_task=m.mu_task, form=m.form, tau=m.unit_clip,
                   task_smoothing=m.task_smoothing, ema_beta=m.ema_beta, floor=m.floor)


def mixture_batch_rows(m: MixtureConfig, probe: ProbeConfig) -> tuple[int, int]:
    """The research form's extra probe rows of a round: ``(train-mixture, target-mixture)`` batches
    (``probe.mixture_batches`` each; ALGORITHMS.md §4.4). Only methods that move z need train-mixture
    batches (the task update's train direction); static runs, rounds switched off and the alignment
    form need none."""
    if m.form != "research" or not m.adaptive:
        return 0, 0
    return (probe.mixture_batches if m.method in UPDATES_TASKS else 0), probe.mixture_batches


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


def _batch_rows(stats: RoundStats, part: str) -> slice:
    rows = stats.rows(part)
    if rows.stop <= rows.start:
        what = {"train_batches": "train-mixture", "target_batches": "target-mixture"}[part]
        raise ValueError(f"the research form needs {what} batch rows in the round's Gram matrix "
                         "(probe.mixture_batches > 0)")
    return rows


def _task_update(variant: str, alpha, z, stats: RoundStats, ema, p: MethodParams):
    g, losses = stats.gram, stats.losses
    d, t = stats.rows("domains"), stats.rows("tasks")
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))    # [U]
    scale_t = _task_scale(variant, losses[t], norms[t], ema, p)  # [N]
    if p.form == "alignment":
        train_dir = alpha @ g[d, t]                 # [N]  <sum_k alpha_k g_k, g_n>
    else:
        # u = mean_r clip(e_r): each train-mixture batch clipped on its own, then averaged
        e = _batch_rows(stats, "train_batches")
        train_dir = _clip_scale(norms[e], p.tau) @ g[e, t] / (e.stop - e.start)  # [N]  <g_n, u>
    score = _fill_missing(scale_t * train_dir, stats.counts[t] > 0)  # [N] <h_n, u>
    z_new = softmax_step(z, score, -p.mu_task)
    z_new = (1 - p.task_smoothing) * z_new + p.task_smoothing / len(z_new)
    return z_new, score


def _domain_update(variant: str, alpha, z, stats: RoundStats, ema, p: MethodParams):
    g, losses = stats.gram, stats.losses
    d, t = stats.rows("domains"), stats.rows("tasks")
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    log_target = variant != "grape_gap"
    if p.form == "alignment":
        denom = (ema if variant == "grape_ema" else losses[t]) if log_target else np.ones(len(z))
        score = g[d, t] @ (z / denom)               # [K] sum_n z_n W_kn / l_n
    else:
        # v = mean_r clip(grad phi(l(c_r))): phi = log divides batch r's gradient by its loss first
        c = _batch_rows(stats, "target_batches")
        a = 1.0 / losses[c] if log_target else np.ones(c.stop - c.start)  # [B]
        v_coef = _clip_scale(a * norms[c], p.tau) * a / (c.stop - c.start)  # [B]: v = sum_r v_coef_r c_r
        score = _clip_scale(norms[d], p.tau) * (g[d, c] @ v_coef)          # [K] <clip(g_k), v>
    score = _fill_missing(score, stats.counts[d] > 0)
    return _apply_floor(softmax_step(alpha, score, p.mu_domain), p.floor), score


def _update_ema(ema, losses_t: np.ndarray, beta: float) -> np.ndarray:
    if ema is None:
        return losses_t.copy()                      # starts at the first observed loss
    return beta * np.asarray(ema) + (1 - beta) * losses_t


def _grape_family(variant: str) -> Callable:
    def method(state: dict, stats: RoundStats, p: MethodParams, tasks_only: bool = False) -> Update:
        alpha, z = np.asarray(state["alpha"]), np.asarray(state["z"])
        ema = _update_ema(state.get("ema"), stats.losses[stats.rows("tasks")], p.ema_beta)  # before use
        z_new, task_score = _task_update(variant, alpha, z, stats, ema, p)  # task first (GRAPE order)
        if tasks_only:
            return Update(alpha, z_new, ema.tolist(), {"task_score": task_score.tolist()})
        alpha_new, domain_score = _domain_update(variant, alpha, z_new, stats, ema, p)
        return Update(alpha_new, z_new, ema.tolist(),
                      {"alignment": domain_score.tolist(), "task_score": task_score.tolist()})
    method.__name__ = variant
    method.__doc__ = f"``{variant}``: task weights by exponentiated gradient on the train alignment, " \
                     "then domain weights toward the z-weighted target direction."
    return method


def doge(state: dict, stats: RoundStats, p: MethodParams, tasks_only: bool = False) -> Update:
    """``doge``: domain update only (log-loss target side, as the research configs run it); z frozen."""
    alpha, z = np.asarray(state["alpha"]), np.asarray(state["z"])
    ema = _update_ema(state.get("ema"), stats.losses[stats.rows("tasks")], p.ema_beta)
    if tasks_only:
        return Update(alpha, z, ema.tolist())
    alpha_new, score = _domain_update("grape", alpha, z, stats, ema, p)
    return Update(alpha_new, z, ema.tolist(), {"alignment": score.tolist()})


def static(state: dict, stats: RoundStats, p: MethodParams, tasks_only: bool = False) -> Update:
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
# Methods whose round moves z before alpha: in the research form their target-mixture batches are
# drawn from the new z (MixtureController.preview_z), after a first reduction.
UPDATES_TASKS = ("grape", "grape_ema", "grape_gap")


def _normalise(w, n: int) -> np.ndarray:
    """Weights on the simplex (uniform when None); scaled by their largest entry first, so weights
    near the float64 limit (``[1e308, 1e308, 1]``) do not overflow the sum."""
    if n == 0:
        return np.zeros(0)
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(w, dtype=np.float64)
    w = w / w.max()
    return w / w.sum()


class MixtureController:
    """Holds alpha [K] and z [N] and applies the configured method once per round."""

    @classmethod
    def from_config(cls, m: MixtureConfig, domains: list[str], tasks: list[str]) -> "MixtureController":
        """The ``mixture:`` section's controller (method, initial weights, hyperparameters)."""
        return cls(m.method, domains, tasks, m.weights, m.task_weights, MethodParams.from_config(m))

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

    def preview_z(self, stats: RoundStats) -> np.ndarray:
        """The z this round's update will set, from the rows measured so far (domains, tasks and
        train-mixture batches; no target-mixture rows yet). Changes nothing. The research form draws
        its target-mixture batches from it, as the research code's domain update samples the target
        mixture after the task update. Methods that do not move z, and rounds with non-finite
        measurements (which :meth:`round` will skip), give the current z."""
        finite = np.all(np.isfinite(stats.losses)) and np.all(np.isfinite(stats.gram))
        if self.method not in UPDATES_TASKS or not finite:
            return self.z.copy()
        state = {"alpha": self.alpha, "z": self.z, "ema": self.ema}
        z = METHOD_FNS[self.method](state, stats, self.params, tasks_only=True).z
        return z if np.all(np.isfinite(z)) else self.z.copy()

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
