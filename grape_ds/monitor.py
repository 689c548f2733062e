"""TensorBoard and console output, from global rank 0 only.

:func:`build_monitor` returns a :class:`Monitor` on rank 0 and a :class:`NullMonitor` elsewhere, so
call sites never test the rank. All scalars of one vector (domain weights, realised shares, per-domain
eval losses) share one chart through TensorBoard's custom-scalars layout. Every step also goes to
``<run>/metrics.jsonl`` so the curves can be read without TensorBoard.
"""

from __future__ import annotations

import math

from tqdm import tqdm

from grape_ds.rundir import RunPaths, append_jsonl, truncate_jsonl

__all__ = ["build_monitor", "Monitor", "NullMonitor"]


class NullMonitor:
    """What ranks other than 0 get: every call does nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def vector(self, step: int, prefix: str, names, values) -> None:
        pass

    def record(self, step: int, row: dict) -> None:
        pass

    def progress(self, step: int, **postfix) -> None:
        pass

    def close(self) -> None:
        pass


def _layout(domains: list[str], tasks: list[str]) -> dict:
    from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: F401  (checks the plugin exists)
    charts = {
        "domain weights (in use)": ["Multiline", [r"mixture/domain/.*"]],
        "domain weights (average)": ["Multiline", [r"mixture_avg/domain/.*"]],
        "realised domain shares": ["Multiline", [r"mixture/realised/.*"]],
        "eval loss per domain": ["Multiline", [r"eval/loss/.*"]],
    }
    if tasks:
        charts.update({
            "task weights (in use)": ["Multiline", [r"mixture/task/.*"]],
            "task weights (average)": ["Multiline", [r"mixture_avg/task/.*"]],
            "eval loss per task": ["Multiline", [r"eval/task_loss/.*"]],
            # per round: cos(g_domain, g_task); negative = training on the domain hurts the task
            "gradient cosine domain/task": ["Multiline", [r"reweight/cosine/.*"]],
            # only benchmark tasks with multiple-choice items log these; the charts stay empty otherwise
            "accuracy per task (acc)": ["Multiline", [r"eval/acc/.*"]],
            "accuracy per task (acc_norm)": ["Multiline", [r"eval/acc_norm/.*"]],
        })
    return {"mixture": charts}


class Monitor:
    """TensorBoard writer under ``<run>/tensorboard/``, metrics JSON lines, and a progress bar."""

    def __init__(self, paths: RunPaths, domains: list[str], tasks: list[str], total_steps: int,
                 start_step: int = 0, progress: bool = True) -> None:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events a crashed attempt wrote past the checkpoint we resumed from.
        self.writer = SummaryWriter(str(paths.tensorboard), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_custom_scalars(_layout(domains, tasks))
        self.metrics_path = paths.metrics
        truncate_jsonl(self.metrics_path, start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not progress)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, float(v), step)

    def vector(self, step: int, prefix: str, names, values) -> None:
        """One scalar per entry: ``<prefix>/<name>``."""
        for name, v in zip(names, values):
            self.writer.add_scalar(f"{prefix}/{name}", float(v), step)

    def record(self, step: int, row: dict) -> None:
        append_jsonl(self.metrics_path, {"step": step, **row})

    def progress(self, step: int, **postfix) -> None:
        self.bar.n = step
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else v)
                              for k, v in postfix.items()}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        self.writer.flush()
        self.writer.close()


def build_monitor(rank: int, *args, **kwargs):
    return Monitor(*args, **kwargs) if rank == 0 else NullMonitor()
