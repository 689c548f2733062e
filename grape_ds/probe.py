"""The gradient probe: per-unit gradient projections captured by tensor hooks.

Hooks are registered on every parameter *before* ``deepspeed.initialize``; they see each rank's
local, unreduced gradient of one backward (``reference/DEEPSPEED_CPU.md`` §2a), under every ZeRO-2
option, and never touch ``p.grad`` or DeepSpeed's partitions. While a unit (a source domain or a target
task) is active, each hook adds a fixed linear projection of its parameter's gradient to that unit's
row of a small ``[units, m]`` fp32 buffer. Because the projection is linear, one ``all_reduce`` of
the buffer (with per-unit loss sums and counts) gives the projection of every unit's *globally
reduced* gradient, whatever the number of ranks; the Gram matrix of the rows estimates the dot
products the controller needs (``reference/ALGORITHMS.md`` §9.4).

Estimators:

* ``sketch``: a signed bucket sketch. Coordinate ``i`` of parameter ``p`` goes to bucket
  ``(offset_p + i) mod m`` with a random sign ``s_p[i]``; signs and offsets are a pure function of
  ``(seed, round)``, the same on every rank, and the signs are stored packed (one bit per parameter
  entry, 1/32 of an fp32 copy of the model). The projection is never a P x m matrix.
  ``E<Sa, Sb> = <a, b>`` over draws of the projection, so the projection is **drawn afresh for every
  round** (:meth:`GradientProbe.set_round`): with one projection for the whole run, its error on the
  gradients' persistent components would be the same every round, a bias that accumulates in the
  weights instead of averaging out (``reference/ALGORITHMS.md`` §9.4: re-draw to decorrelate errors).
* ``exact``: the identity (``m = P``): the buffer holds the full flattened gradients, so the Gram
  matrix is exact. For small models and as the oracle the sketch is measured against.

Tied weights (GPT-2's ``wte``/``lm_head``) are one parameter and are counted once.
"""

from __future__ import annotations

import itertools

from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from grape_ds.config import ESTIMATORS, ProbeConfig
from grape_ds.distributed import all_reduce_sum

__all__ = ["GradientProbe", "Reduced", "ESTIMATORS", "sketch_seed"]

_BITS = (1, 2, 4, 8, 16, 32, 64, 128)  # bit i of a packed sign byte


def sketch_seed(seed: int, round_key: int) -> int:
    """The generator seed of round ``round_key``'s projection: a fixed mix of the two integers (the
    same on every rank and every run, so a resumed run projects as the uninterrupted one did)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(round_key) * 0xBF58476D1CE4E5B9) % (1 << 63)


class GradientProbe:
    """Hooks on ``model``'s parameters that project gradients into per-unit rows.

    Args:
        model: the module whose parameters are hooked (call before ``deepspeed.initialize``).
        num_units: rows of the buffer (domains then tasks).
        estimator: ``"sketch"`` or ``"exact"``.
        dim: sketch dimension m (ignored by ``exact``).
        seed: seeds the signs and offsets (with the round, :meth:`set_round`); the same on every rank.
        staged: keep contributions of the current optimizer step apart until :meth:`commit_step`
            (or :meth:`discard_step`, for a step the engine skipped after an fp16 overflow); costs a
            second ``[units, m]`` buffer. Without it, contributions go straight into the round's sums.

    Devices: the buffers live on the parameters' device (``grape_ds.devices``); if the parameters
    move after the probe was built (``deepspeed.initialize`` moves the model to the accelerator), the
    probe follows them at the first gradient it sees, or at :meth:`to`. Accumulation is fp32 whatever
    the gradients' dtype.
    """

    @classmethod
    def from_config(cls, model: torch.nn.Module, num_units: int, cfg: ProbeConfig,
                    staged: bool = False) -> "GradientProbe":
        """The ``probe:`` section's probe (estimator, dim, seed) of ``num_units`` rows on ``model``."""
        return cls(model, num_units, cfg.estimator, cfg.dim, cfg.seed, staged=staged)

    def __init__(self, model: torch.nn.Module, num_units: int, estimator: str = "sketch",
                 dim: int = 8192, seed: int = 0, staged: bool = False) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown probe estimator {estimator!r}; choose from {list(ESTIMATORS)}")
        self.estimator, self.num_units, self.staged, self.seed = estimator, num_units, staged, int(seed)
        self.params = [p for p in model.parameters() if p.requires_grad]  # unique: tied counted once
        self.numel = sum(p.numel() for p in self.params)
        self.dim = self.numel if estimator == "exact" else int(dim)
        device = self.params[0].device
        self._bits = torch.tensor(_BITS, dtype=torch.uint8, device=device)
        self.offsets: list[int] = []   # exact: start of the parameter in the flat vector; sketch: bucket offset
        self.signs: list[torch.Tensor] = []  # sketch: packed sign bits per parameter, [ceil(n / 8)] uint8
        if estimator == "exact":
            self.offsets = list(itertools.accumulate((p.numel() for p in self.params[:-1]), initial=0))
        self.round_key: int | None = None
        self.set_round(0)
        self.buffer = torch.zeros(num_units, self.dim, dtype=torch.float32, device=device)  # [units, m]
        self.stats = torch.zeros(num_units, 3, dtype=torch.float32, device=device)  # [units, (loss sum, n, seqs)]
        self._pending, self._pending_stats = self._new_pending()
        self.active: int | None = None
        self.scale = 1.0
        self._handles = [p.register_hook(self._make_hook(i)) for i, p in enumerate(self.params)]

    def set_round(self, round_key: int) -> None:
        """Draw the projection of round ``round_key`` (the sketch's; the exact estimator has none).

        A pure function of ``(seed, round_key)``, drawn on the CPU so every rank and device type gets
        the same bits. Call it only while the buffer holds nothing (after :meth:`reduce`): rows
        projected with different draws must not be added together. The loop keys a round by the
        optimizer step it runs after."""
        if self.estimator == "exact" or round_key == self.round_key:
            return
        gen = torch.Generator(device="cpu").manual_seed(sketch_seed(self.seed, round_key))
        offsets, signs = [], []
        for p in self.params:
            offsets.append(int(torch.randint(0, self.dim, (1,), generator=gen, device="cpu")))
            signs.append(torch.randint(0, 256, ((p.numel() + 7) // 8,), generator=gen, dtype=torch.uint8,
                                       device="cpu").to(self._bits.device))
        self.offsets, self.signs, self.round_key = offsets, signs, round_key

    def _new_pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.staged:
            return self.buffer, self.stats  # contributions land in the round's sums directly
        return torch.zeros_like(self.buffer), torch.zeros_like(self.stats)

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def to(self, device: torch.device | str) -> "GradientProbe":
        """Move the buffers and the projection's tables to ``device`` (their values are kept)."""
        device = torch.device(device)
        if device != self.buffer.device:
            self.buffer, self.stats = self.buffer.to(device), self.stats.to(device)
            self._pending = self.buffer if not self.staged else self._pending.to(device)
            self._pending_stats = self.stats if not self.staged else self._pending_stats.to(device)
            self.signs = [s.to(device) for s in self.signs]
            self._bits = self._bits.to(device)
        return self

    # -- capture --------------------------------------------------------------------------------

    def _make_hook(self, index: int):
        def hook(grad: torch.Tensor):
            if self.active is not None:
                self._add(index, grad)
            return None  # never changes the gradient
        return hook

    def _sign_vector(self, index: int, n: int) -> torch.Tensor:
        packed = self.signs[index]
        bits = (packed.unsqueeze(1) & self._bits) != 0               # [ceil(n/8), 8]
        return bits.reshape(-1)[:n].float() * 2 - 1                  # [n] of +-1

    @torch.no_grad()
    def _add(self, index: int, grad: torch.Tensor) -> None:
        if grad.device != self.buffer.device:
            self.to(grad.device)  # the model moved after the probe was built: follow it
        g = grad.detach().reshape(-1).float()  # fp32 accumulation even for bf16 gradients
        if self.scale != 1.0:
            g = g * self.scale
        row = self._pending[self.active]
        if self.estimator == "exact":
            start = self.offsets[index]
            row[start:start + g.numel()] += g
            return
        n, m = g.numel(), self.dim
        v = g * self._sign_vector(index, n)
        if n % m:
            v = F.pad(v, (0, m - n % m))
        folded = v.view(-1, m).sum(0)                     # [m]: bucket i mod m
        row += torch.roll(folded, self.offsets[index])    # bucket (offset + i) mod m

    @contextmanager
    def unit(self, unit: int, scale: float = 1.0):
        """Within the block, every backward's gradient is added to ``unit``'s row (times ``scale``:
        for example ``gradient_accumulation_steps / loss_scale`` to undo what ``engine.backward``
        multiplied the loss by)."""
        self.active, self.scale = unit, float(scale)
        try:
            yield
        finally:
            self.active, self.scale = None, 1.0

    def record(self, unit: int, loss: float | torch.Tensor, sequences: int) -> None:
        """One gradient contribution of ``unit`` (a micro-batch or probe batch) with its mean loss.

        ``loss`` may be a 0-dim tensor on the probe's device: it is added there, without a host sync."""
        row = self._pending_stats[unit]
        row[0] += loss.detach().float() if isinstance(loss, torch.Tensor) else float(loss)
        row[1] += 1.0
        row[2] += float(sequences)

    def pending_row(self, unit: int) -> torch.Tensor:
        """``unit``'s contributions not yet committed (``[m]``; the round's row when not staged)."""
        return self._pending[unit]

    def commit_step(self) -> None:
        """Add the current step's contributions to the round's sums (staged probes; else a no-op)."""
        if self.staged:
            self.buffer += self._pending
            self.stats += self._pending_stats
            self._pending.zero_()
            self._pending_stats.zero_()

    def discard_step(self) -> None:
        """Drop the current step's contributions: the engine skipped the step (fp16 overflow), so its
        gradients are not finite. Only a staged probe can do this.

        Raises:
            RuntimeError: the probe is not staged.
        """
        if not self.staged:
            raise RuntimeError("discard_step needs a probe built with staged=True")
        self._pending.zero_()
        self._pending_stats.zero_()

    # -- reduce ---------------------------------------------------------------------------------

    def contributions(self) -> torch.Tensor:
        """This rank's committed contributions per unit (``[U]`` float, on the probe's device)."""
        return self.stats[:, 1].clone()

    def reduce(self, rows: slice = slice(None)) -> "Reduced":
        """One all_reduce over ranks of the units in ``rows`` (all by default); returns what a round
        needs of them (:class:`Reduced`) and resets those rows.

        A unit's projection is the mean of its contributions' projected gradients over all ranks,
        i.e. the projection of the gradient of its mean loss over all its batches. Contributions not
        yet committed (probe batches of a staged probe) are committed first. A unit nobody measured
        has a zero projection, loss 0 and 0 sequences.
        """
        self.commit_step()
        buf, st = self.buffer[rows], self.stats[rows]
        r, m = buf.shape
        flat = torch.cat([buf.reshape(-1), st.reshape(-1)])  # [R*m + 3R]
        all_reduce_sum(flat)
        proj, stats = flat[: r * m].view(r, m), flat[r * m:].view(r, 3)
        n = stats[:, 1].clamp(min=1)
        buf.zero_()
        st.zero_()
        return Reduced(proj / n[:, None], stats[:, 0] / n, stats[:, 2])

    @staticmethod
    def gram(proj: torch.Tensor) -> torch.Tensor:
        """``[U, U]`` dot products of the projected unit gradients, in float64."""
        p = proj.double()
        return p @ p.T

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's partial (unreduced) sums: saved per rank so a resume mid-window is exact."""
        return {"buffer": self.buffer.cpu().clone(), "stats": self.stats.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.copy_(state["buffer"])
        self.stats.copy_(state["stats"])

    def memory_bytes(self) -> int:
        """What the probe itself holds: the buffers (twice when staged) and the packed signs of one
        round's projection."""
        buffers = (self.buffer.numel() + self.stats.numel()) * 4 * (2 if self.staged else 1)
        return buffers + sum(s.numel() for s in self.signs)


class Reduced(NamedTuple):
    """Units' reduced measurements (:meth:`GradientProbe.reduce`), on the probe's device."""
    proj: torch.Tensor       # [R, m] mean projected gradient of each unit, fp32
    losses: torch.Tensor     # [R] mean loss per contribution (nats per token), fp32
    sequences: torch.Tensor  # [R] sequences measured over all ranks (0: the unit was not measured)

    def cat(self, other: "Reduced") -> "Reduced":
        """The rows of ``self`` followed by those of ``other``."""
        return Reduced(*(torch.cat(pair) for pair in ((self.proj, other.proj), (self.losses, other.losses),
                                                       (self.sequences, other.sequences))))

    def host(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(losses [R] float64, Gram matrix [R, R] float64 of the projections, sequences [R])`` on the
        host: what the controller's :class:`grape_ds.controller.RoundStats` holds."""
        return (self.losses.double().cpu().numpy(), GradientProbe.gram(self.proj).cpu().numpy(),
                self.sequences.cpu().numpy())
