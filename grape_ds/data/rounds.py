"""The extra batches of a reweighting round, drawn from the packed data.

A round measures each unit's gradient on a probe batch (:func:`unit_batches`: the target tasks, and
the source domains the training micro-batches did not cover) and, in the research form, the gradient
of mixture batches whose every sequence draws its own unit from the current weights
(:func:`mixture_batches`: the research code's train-mixture ``e_r`` from alpha and target-mixture
``c_r`` from z; ALGORITHMS.md §4.4). Like the sampler's draws, every batch is a pure function of
``(seed, rank, step, row)`` (:func:`grape_ds.data.sampler.probe_windows`,
:func:`grape_ds.data.sampler.mixture_batch`), so a resumed run draws what the uninterrupted one did.
Batches are int64 ``[rows, seq_len]`` tensors on the host; the caller moves them to its device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from grape_ds.data.packing import PackedData
from grape_ds.data.sampler import TARGET_MIXTURE, TRAIN_MIXTURE, mixture_batch, probe_windows

__all__ = ["unit_batches", "mixture_batches", "TRAIN_MIXTURE", "TARGET_MIXTURE"]


def unit_batches(data: PackedData, units: Sequence[int], batch_size: int, *, seed: int, rank: int,
                 step: int) -> list[tuple[int, torch.Tensor]]:
    """``(row, batch)`` for each unit row in ``units`` (domains then tasks, as in
    ``data.domains + data.tasks``): ``batch_size`` train windows of that unit for this rank's probe
    of the round after optimizer step ``step``."""
    names = data.domains + data.tasks
    out = []
    for u in units:
        windows = probe_windows(data.num_windows(names[u], "train"), batch_size, seed=seed, rank=rank,
                                step=step, unit=u)
        out.append((u, data.batch(names[u], windows)))
    return out


def mixture_batches(data: PackedData, stream: int, probs, first_row: int, count: int, batch_size: int, *,
                    seed: int, rank: int, step: int) -> list[tuple[int, torch.Tensor]]:
    """``count`` mixture batches for rows ``first_row, first_row + 1, ...``: ``stream`` is
    :data:`TRAIN_MIXTURE` (each sequence's domain drawn from ``probs`` = alpha [K]) or
    :data:`TARGET_MIXTURE` (each sequence's task drawn from ``probs`` = z [N])."""
    names = data.domains if stream == TRAIN_MIXTURE else data.tasks
    sizes = np.array([data.num_windows(n, "train") for n in names], dtype=np.int64)
    out = []
    for r in range(count):
        draw = mixture_batch(np.asarray(probs, dtype=np.float64), sizes, batch_size, seed=seed, rank=rank,
                             step=step, stream=stream, index=r)
        out.append((first_row + r, data.batch([names[u] for u in draw.domains], draw.windows)))
    return out
