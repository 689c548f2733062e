"""Per-rank weighted mixture sampler.

Every draw is a pure function of ``(seed, rank, step, micro_step, weights)``: the random numbers come
from a counter-based generator (Philox) whose key is the seed and whose counter is set from
``(rank, step, micro_step)``. So there is no hidden RNG state: resuming at step ``s`` reproduces exactly
the micro-batches an uninterrupted run would have drawn, ranks never share a stream, and new weights
apply at the next draw without rebuilding anything.

A draw returns, per sequence, a (domain, window) pair: domains are chosen with the mixture
probabilities, windows uniformly with replacement inside the domain (as the research code does).
The sampler draws exactly the weights it is given (normalised): a weight of 0 is never drawn. Keeping
adaptive weights above a floor is the controller's job, so what it reports is what is sampled.
``domain_pure`` draws one domain per micro-batch (what the in-band gradient probe needs);
``mixed`` draws a domain per sequence. No per-row weight list is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MixtureSampler", "RealisedCounts", "Draw", "mixture_probabilities", "draw_indices", "probe_windows", "mixture_batch",
           "TRAIN_MIXTURE", "TARGET_MIXTURE"]

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


def mixture_probabilities(weights) -> np.ndarray:
    """``weights`` [K] normalised to the simplex, exactly (no floor; a 0 stays 0). Scaled by their
    largest entry first, so weights near the float64 limit do not overflow the sum.

    Raises:
        ValueError: not a non-empty vector of finite, non-negative weights with a positive entry.
    """
    w = np.asarray(weights, dtype=np.float64)  # [K]
    if w.ndim != 1 or w.shape[0] == 0:
        raise ValueError(f"weights must be a non-empty vector, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.max() > 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    w = w / w.max()
    return w / w.sum()


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


TRAIN_MIXTURE, TARGET_MIXTURE = 2, 3  # streams of a round's mixture batches (1 is the unit probes')


def mixture_batch(probs: np.ndarray, sizes: np.ndarray, batch: int, *, seed: int, rank: int, step: int,
                  stream: int, index: int) -> Draw:
    """Batch ``index`` of a reweighting round's mixture ``stream`` (:data:`TRAIN_MIXTURE`: domains
    from alpha; :data:`TARGET_MIXTURE`: tasks from z) at the round after ``step``: every sequence's
    unit drawn from ``probs`` [U], its window uniform in ``sizes`` [U], as the research code's
    ``M_train(alpha)`` / ``M_tgt(z)`` batches are. A pure function, apart from every other stream."""
    return draw_indices(probs, sizes, batch, False, seed=seed, rank=rank, step=step,
                        micro_step=(stream << 32) + index)


class RealisedCounts:
    """Sequences this rank drew per domain since they were last taken (``counts``: [K] int64): the
    sampler's per-rank state, checkpointed in each rank's own file."""

    def __init__(self, num_domains: int) -> None:
        self.counts = np.zeros(num_domains, dtype=np.int64)  # [K]

    def add(self, domains: np.ndarray) -> None:
        np.add.at(self.counts, domains, 1)

    def take(self) -> np.ndarray:
        """The counts ([K] int64), reset to zero."""
        counts, self.counts = self.counts, np.zeros_like(self.counts)
        return counts

    def state_dict(self) -> dict:
        return {"counts": self.counts.copy()}

    def load_state_dict(self, state) -> None:
        """``{"counts": [K]}``; a bare ``[K]`` array (the format of earlier grape-ds) is accepted."""
        self.counts[:] = state["counts"] if isinstance(state, dict) else state


class MixtureSampler:
    """Draws micro-batches for one rank from the current mixture weights.

    Args:
        sizes: train windows per domain, ``[K]``.
        weights: initial mixture weights (normalised here; the floor is applied on top).
        seed: run seed, shared by all ranks.
        rank: this process's global rank.
        micro_batch_size: sequences per draw.
        mode: ``"domain_pure"`` or ``"mixed"``.
        data_hash: content hash of the packed data; a checkpoint from other data is refused.
    """

    def __init__(self, sizes, weights, *, seed: int, rank: int, micro_batch_size: int, mode: str = "domain_pure", data_hash: str = "") -> None:
        if mode not in ("domain_pure", "mixed"):
            raise ValueError(f"unknown batch mode {mode!r}; choose 'domain_pure' or 'mixed'")
        self.sizes = np.asarray(sizes, dtype=np.int64)  # [K]
        if np.any(self.sizes <= 0):
            raise ValueError(f"every domain needs at least one window, got sizes {self.sizes.tolist()}")
        self.seed, self.rank = int(seed), int(rank)
        self.micro_batch_size, self.mode = int(micro_batch_size), mode
        self.data_hash = data_hash
        self.realised = RealisedCounts(len(self.sizes))
        self.set_weights(weights)

    @property
    def num_domains(self) -> int:
        return len(self.sizes)

    def set_weights(self, weights) -> None:
        """New mixture weights; they apply from the next draw."""
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != self.sizes.shape:
            raise ValueError(f"{w.shape[0] if w.ndim else 0} weights for {self.num_domains} domains")
        self.probs = mixture_probabilities(w)  # [K], what is drawn

    def draw(self, step: int, micro_step: int) -> Draw:
        """The micro-batch of optimizer step ``step`` (0-based), micro-batch ``micro_step``."""
        d = draw_indices(self.probs, self.sizes, self.micro_batch_size, self.mode == "domain_pure",
                         seed=self.seed, rank=self.rank, step=step, micro_step=micro_step)
        self.realised.add(d.domains)
        return d

    # Stateful protocol. Draws depend only on (seed, rank, step, micro_step, weights), so the state is
    # the weights in use and what identifies the stream (the same on every rank); the realised counts
    # are this rank's own (``self.realised``, checkpointed per rank).
    def state_dict(self) -> dict:
        return {"seed": self.seed, "weights": self.probs.tolist(), "mode": self.mode,
                "data_hash": self.data_hash}

    def load_state_dict(self, state: dict) -> None:
        if state.get("data_hash", "") != self.data_hash:
            raise ValueError(
                f"checkpoint was made on packed data {state.get('data_hash')!r} but this run uses "
                f"{self.data_hash!r}: the sources, tokenizer or seq_len changed; start a new run "
                "directory (or --no-resume) instead of resuming")
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint seed {state['seed']} differs from train.seed {self.seed}")
        self.set_weights(state["weights"])
