"""Evaluation: per-unit validation loss, sweeping every validation window (not sampling them).

Each rank takes windows ``rank, rank + world, ...`` of every domain's and task's validation split,
sums token cross-entropy and token counts, and one all-reduce gives the exact per-unit mean loss,
independent of the number of ranks and of the batch size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from grape_ds.distributed import all_reduce_sum

__all__ = ["Evaluator", "sweep_losses"]


@torch.no_grad()
def sweep_losses(model: torch.nn.Module, windows_by_unit: dict[str, np.ndarray], batch_size: int,
                 rank: int = 0, world_size: int = 1, max_windows: int | None = None) -> dict[str, float]:
    """Mean next-token loss per unit over its windows (``[n, seq_len]`` arrays), reduced over ranks."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(len(windows_by_unit), 2, dtype=torch.float64)  # [units, (loss sum, tokens)]
    for u, windows in enumerate(windows_by_unit.values()):
        n = len(windows) if max_windows is None else min(len(windows), max_windows)
        mine = np.arange(rank, n, world_size)
        for start in range(0, len(mine), batch_size):
            x = torch.from_numpy(np.asarray(windows[mine[start:start + batch_size]], dtype=np.int64)).to(device)
            logits = model(input_ids=x).logits.float()  # [B, T, V]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                   reduction="sum")
            sums[u, 0] += loss.item()
            sums[u, 1] += x[:, 1:].numel()
    all_reduce_sum(sums)
    model.train(was_training)
    return {name: (sums[u, 0] / sums[u, 1]).item() if sums[u, 1] > 0 else float("nan")
            for u, name in enumerate(windows_by_unit)}


class Evaluator:
    """Runs the sweep every ``every`` steps; results to TensorBoard and ``<run>/eval/eval.jsonl``."""

    def __init__(self, data, every: int, batch_size: int, max_windows: int | None, rank: int,
                 world_size: int, run_dir: Path) -> None:
        self.data, self.every, self.batch_size, self.max_windows = data, every, batch_size, max_windows
        self.rank, self.world_size = rank, world_size
        self.path = Path(run_dir) / "eval" / "eval.jsonl"

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def run(self, model: torch.nn.Module, step: int, monitor) -> dict:
        domains = sweep_losses(model, {d: self.data.windows(d, "val") for d in self.data.domains},
                               self.batch_size, self.rank, self.world_size, self.max_windows)
        tasks = sweep_losses(model, {t: self.data.windows(t, "val") for t in self.data.tasks},
                             self.batch_size, self.rank, self.world_size, self.max_windows)
        result = {"step": step, "domain_loss": domains, "task_loss": tasks,
                  "domain_loss_avg": float(np.mean(list(domains.values()))),
                  "domain_loss_worst": float(np.max(list(domains.values())))}
        if tasks:
            result.update(task_loss_avg=float(np.mean(list(tasks.values()))),
                          task_loss_worst=float(np.max(list(tasks.values()))))
        monitor.vector(step, "eval/loss", domains.keys(), domains.values())
        monitor.vector(step, "eval/task_loss", tasks.keys(), tasks.values())
        monitor.scalars(step, {k: v for k, v in result.items() if k.endswith(("_avg", "_worst"))})
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(result) + "\n")
        return result
