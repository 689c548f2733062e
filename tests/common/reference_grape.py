"""An independent re-implementation of GRAPE's reweighting rules on flat gradient vectors.

Written from ``../shared/reference/ALGORITHMS.md`` alone (§2.4 how unit gradients are made, §4.1 the
domain update, §4.2-§4.4 the task updates, §4.10 the alignment form) and kept apart from the code it
checks: it imports nothing from grape_ds, works on the gradient vectors themselves (dot products and
norms of actual vectors, never a Gram matrix), and clips vectors the way the research code clips
``.grad`` in place. ``tests/test_reference.py`` feeds it and the controller the same real gradients.

The research code's round (GRAPE order: task update first, then the domain update):

* task update (``grape``, ``grape_ema``, ``grape_gap``): ``u`` is the mean of the train-mixture
  batches' gradients, each clipped to ``tau`` on its own; ``h_n = clip(g_n / l_n)`` (grape),
  ``clip(g_n) / ema_n`` (grape_ema, the EMA updated before use and started at the first loss) or
  ``clip(g_n)`` (grape_gap); ``z <- softmax(log z - mu_task <h_n, u>)``, then
  ``z <- (1 - s) z + s / N``;
* domain update: target-mixture batches drawn from the *new* z; ``v`` is the mean of their
  ``clip(grad phi(l))``, ``phi = log`` (grape, grape_ema and the doge baseline) or the identity
  (grape_gap); ``alpha <- softmax(log alpha + mu_domain <clip(g_k), v>)``. doge moves alpha only.

The alignment form (§4.10, no clipping, no mixture batches): with ``W_kn = <g_k, g_n>``,
``z <- softmax(log z - mu_task sum_k alpha_k W_kn / d_n)`` and
``alpha <- softmax(log alpha + mu_domain sum_n z_n W_kn / d_n)``, ``d_n`` the task loss (grape,
doge), its EMA (grape_ema) or 1 (grape_gap); z is smoothed as above.
"""

from __future__ import annotations

import numpy as np

LOG_TARGET = {"grape": True, "grape_ema": True, "grape_gap": False, "doge": True}
CLIPS = {"bound": 0, "free": 0}  # how often clipping changed a vector, and how often not


def clip(v: np.ndarray, tau: float | None) -> np.ndarray:
    """``v`` scaled down to norm ``tau`` if it is longer (``clip_grad_norm_`` on one gradient)."""
    norm = float(np.linalg.norm(v))
    bound = tau is not None and norm > tau
    CLIPS["bound" if bound else "free"] += 1
    return v * (tau / norm) if bound else v


def exp_step(w: np.ndarray, scores: np.ndarray, mu: float) -> np.ndarray:
    """``softmax(log w + mu * scores)``."""
    x = np.log(w) + mu * scores
    x = np.exp(x - x.max())
    return x / x.sum()


class Reference:
    """State (alpha, z, EMA) and one round at a time."""

    def __init__(self, variant: str, form: str, k: int, n: int, mu_domain: float, mu_task: float, tau: float,
                 smoothing: float, ema_beta: float) -> None:
        self.variant, self.form = variant, form
        self.alpha, self.z, self.ema = np.full(k, 1.0 / k), np.full(n, 1.0 / n), None
        self.mu_domain, self.mu_task, self.tau, self.smoothing, self.beta = mu_domain, mu_task, tau, smoothing, ema_beta

    def _smooth(self, z: np.ndarray) -> np.ndarray:
        return (1 - self.smoothing) * z + self.smoothing / len(z)

    def round(self, domain_grads, task_grads, task_losses, train_batch_grads, draw_target):
        """One round. ``draw_target(z)`` returns the target-mixture batches' (gradients, losses),
        drawn from the z the task update has just set (research form only)."""
        task_losses = np.asarray(task_losses, dtype=np.float64)
        self.ema = task_losses.copy() if self.ema is None else self.beta * self.ema + (1 - self.beta) * task_losses
        if self.form == "research":
            self._research(domain_grads, task_grads, task_losses, train_batch_grads, draw_target)
        else:
            self._alignment(domain_grads, task_grads, task_losses)

    def _research(self, domain_grads, task_grads, task_losses, train_batch_grads, draw_target):
        tau = self.tau
        if self.variant != "doge":
            u = np.mean([clip(e, tau) for e in train_batch_grads], axis=0)
            if self.variant == "grape":
                h = [clip(g / l, tau) for g, l in zip(task_grads, task_losses)]
            elif self.variant == "grape_ema":
                h = [clip(g, tau) / e for g, e in zip(task_grads, self.ema)]
            else:
                h = [clip(g, tau) for g in task_grads]
            self.z = self._smooth(exp_step(self.z, np.array([hn @ u for hn in h]), -self.mu_task))
        grads, losses = draw_target(self.z)
        if LOG_TARGET[self.variant]:
            v = np.mean([clip(c / l, tau) for c, l in zip(grads, losses)], axis=0)
        else:
            v = np.mean([clip(c, tau) for c in grads], axis=0)
        scores = np.array([clip(g, tau) @ v for g in domain_grads])
        self.alpha = exp_step(self.alpha, scores, self.mu_domain)

    def _alignment(self, domain_grads, task_grads, task_losses):
        w = np.array([[g @ h for h in task_grads] for g in domain_grads])  # [K, N]
        if self.variant in ("grape", "doge"):
            d = task_losses
        elif self.variant == "grape_ema":
            d = self.ema
        else:
            d = np.ones_like(task_losses)
        if self.variant != "doge":
            self.z = self._smooth(exp_step(self.z, (self.alpha @ w) / d, -self.mu_task))
        self.alpha = exp_step(self.alpha, w @ (self.z / d), self.mu_domain)
