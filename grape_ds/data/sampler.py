"""Per-rank weighted mixture sampler.

Every draw is a pure function of ``(seed, rank, step, micro_step, weights)``: the random numbers come
from a counter-based generator (Philox) whose key is the seed and whose counter is set from
``(rank, step, micro_step)``. So there is no hidden RNG state: resuming at step ``s`` reproduces exactly
the micro-batches an uninterrupted run would have drawn, ranks never share a stream, and new weights
apply at the next draw without rebuilding anything.

A draw returns, per sequence, a (domain, window) pair: domains are chosen with the mixture
probabilities, windows uniformly with replacement inside the domain (as the research code does).
``domain_pure`` draws one domain per micro-batch (what the in-band gradient probe needs);
``mixed`` draws a domain per sequence. No per-row weight list is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MixtureSampler", "Draw", "floored_probabilities", "draw_indices", "probe_windows"]

_PHILOX_SALT = 0x6772617065  # "grape": keeps our streams apart from other Philox users of the seed


@dataclass(frozen=True)
class Draw:
    """One micro-batch's choice: ``domains[i]`` and ``windows[i]`` for each of its sequences."""
    domains: np.ndarray  # [batch] int64, domain index per sequence
    windows: np.ndarray  # [batch] int64, window index inside that domain's train split

    @property
    def pure_domain(self) -> int | None:
        """The domain if every sequence comes from one, else None."""
        first = int(self.domains[0])
        return first if bool((self.domains == first).all()) else None


def floored_probabilities(weights, floor: float) -> np.ndarray:
    """Normalise ``weights`` and mix with uniform so every entry is >= ``floor``.

    ``p = floor + (1 - K * floor) * w / sum(w)``: on the simplex, never below the floor, and equal to
    the normalised weights when ``floor`` is 0.
    """
    w = np.asarray(weights, dtype=np.float64)  # [K]
    k = w.shape[0]
    if w.ndim != 1 or k == 0:
        raise ValueError(f"weights must be a non-empty vector, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    if not 0 <= floor * k < 1:
        raise ValueError(f"floor {floor} x {k} domains must be in [0, 1)")
    return floor + (1.0 - k * floor) * (w / w.sum())


def _generator(seed: int, rank: int, step: int, micro_step: int) -> np.random.Generator:
    # Philox increments counter word 0 while generating; the identity lives in the higher words, so
    # two (rank, step, micro_step) triples can never share random numbers.
    counter = np.array([0, micro_step, step, rank], dtype=np.uint64)
    key = np.array([seed & 0xFFFFFFFFFFFFFFFF, _PHILOX_SALT], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(counter=counter, key=key))


def draw_indices(probs: np.ndarray, sizes: np.ndarray, batch: int, pure: bool, *, seed: int,
                 rank: int, step: int, micro_step: int) -> Draw:
    """The pure draw: domains from ``probs`` [K], windows uniform in ``sizes`` [K]."""
    rng = _generator(seed, rank, step, micro_step)
    cdf = np.cumsum(probs)  # [K]
    u = rng.random(1 if pure else batch)
    domains = np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(probs) - 1)
    if pure:
        domains = np.repeat(domains, batch)
    domains = domains.astype(np.int64)  # [batch]
    windows = (rng.random(batch) * sizes[domains]).astype(np.int64)  # [batch], uniform in [0, size)
    return Draw(domains=domains, windows=np.minimum(windows, sizes[domains] - 1))


def probe_windows(size: int, batch: int, *, seed: int, rank: int, step: int, unit: int) -> np.ndarray:
    """Windows of a probe batch for ``unit`` at the round after ``step``: ``[batch]`` uniform in
    ``[0, size)``, a pure function like the training draws and never overlapping their streams."""
    rng = _generator(seed, rank, step, (1 << 32) + unit)
    return np.minimum((rng.random(batch) * size).astype(np.int64), size - 1)


class MixtureSampler:
    """Draws micro-batches for one rank from the current mixture weights.

    Args:
        sizes: train windows per domain, ``[K]``.
        weights: initial mixture weights (normalised here; the floor is applied on top).
        seed: run seed, shared by all ranks.
        rank: this process's global rank; ``world_size`` is only recorded.
        micro_batch_size: sequences per draw.
        mode: ``"domain_pure"`` or ``"mixed"``.
        floor: minimum probability of every domain.
        data_hash: content hash of the packed data; a checkpoint from other data is refused.
    """

    def __init__(self, sizes, weights, *, seed: int, rank: int, world_size: int,
                 micro_batch_size: int, mode: str = "domain_pure", floor: float = 0.0,
                 data_hash: str = "") -> None:
        if mode not in ("domain_pure", "mixed"):
            raise ValueError(f"unknown batch mode {mode!r}; choose 'domain_pure' or 'mixed'")
        self.sizes = np.asarray(sizes, dtype=np.int64)  # [K]
        if np.any(self.sizes <= 0):
            raise ValueError(f"every domain needs at least one window, got sizes {self.sizes.tolist()}")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.micro_batch_size, self.mode, self.floor = int(micro_batch_size), mode, float(floor)
        self.data_hash = data_hash
        self.counts = np.zeros(len(self.sizes), dtype=np.int64)  # [K] realised since the last pop
        self.set_weights(weights)

    @property
    def num_domains(self) -> int:
        return len(self.sizes)

    def set_weights(self, weights) -> None:
        """New mixture weights; they apply from the next draw."""
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != self.sizes.shape:
            raise ValueError(f"{w.shape[0] if w.ndim else 0} weights for {self.num_domains} domains")
        self.probs = floored_probabilities(w, self.floor)  # [K]
        self.weights = w / w.sum()

    def draw(self, step: int, micro_step: int) -> Draw:
        """The micro-batch of optimizer step ``step`` (0-based), micro-batch ``micro_step``."""
        d = draw_indices(self.probs, self.sizes, self.micro_batch_size, self.mode == "domain_pure",
                         seed=self.seed, rank=self.rank, step=step, micro_step=micro_step)
        np.add.at(self.counts, d.domains, 1)
        return d

    def pop_realised(self) -> np.ndarray:
        """Share of sequences drawn per domain since the last call ([K], sums to 1, or zeros)."""
        counts, self.counts = self.counts, np.zeros_like(self.counts)
        total = counts.sum()
        return counts / total if total else counts.astype(np.float64)

    # Stateful protocol. Draws depend only on (seed, rank, step, micro_step, weights), so the state is
    # the weights in use and what identifies the stream; the realised counts are per-rank state that
    # the loop saves separately.
    def state_dict(self) -> dict:
        return {"seed": self.seed, "weights": self.weights.tolist(), "mode": self.mode,
                "floor": self.floor, "data_hash": self.data_hash}

    def load_state_dict(self, state: dict) -> None:
        if state.get("data_hash", "") != self.data_hash:
            raise ValueError(
                f"checkpoint was made on packed data {state.get('data_hash')!r} but this run uses "
                f"{self.data_hash!r}: the sources, tokenizer or seq_len changed; start a new run "
                "directory (or --no-resume) instead of resuming")
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint seed {state['seed']} differs from train.seed {self.seed}")
        self.set_weights(state["weights"])
