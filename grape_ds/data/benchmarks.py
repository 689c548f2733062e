"""Target benchmarks: hub ids, splits, the LM text of the target loss, and multiple-choice items.

A multiple-choice item is formatted as lm-evaluation-harness formats the task: a context, the
continuation strings of the choices (each with its leading space, as the harness scores them), and the
gold index.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MCItem"]


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: score ``context + choices[i]`` for each ``i``."""
    context: str
    choices: tuple[str, ...]
    gold: int
