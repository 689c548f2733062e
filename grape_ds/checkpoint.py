"""Checkpoints: DeepSpeed engine state plus everything the loop needs, written atomically enough.

``engine.save_checkpoint`` writes the model, the ZeRO optimizer partitions, the LR scheduler and our
``client_state`` (sampler, controller and loop state, from rank 0); each rank also writes its own
``rank<r>_state.pt`` (state that differs per rank, such as the probe's unreduced sums). A checkpoint
is *complete* only once every rank has finished writing it and rank 0 has put a ``COMPLETE`` marker in
its folder, listing every file of every rank with its size and modification time. Resume considers
only complete ones, newest first, checks that every listed file is there as it was written (a shard
deleted, truncated or rewritten since makes the checkpoint incomplete, and the message names the
file), and falls back to the previous one (with a warning) when that check or loading fails on any
rank. The last ``keep_last`` complete checkpoints are kept. A save that runs out of disk space says
so (:class:`CheckpointError`) instead of DeepSpeed's ``basic_ios::clear: iostream error``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from grape_ds.config import CheckpointConfig
from grape_ds.distributed import all_reduce_sum, barrier, get_rank, get_world_size
from grape_ds.schedules import is_due

__all__ = ["Checkpointer", "Stateful", "Restored", "saved_client_state", "consolidated_state_dict",
           "CheckpointError", "complete_checkpoints", "verify_checkpoint", "MARKER",
           "checkpoint_world_size", "to_universal", "merged_rank_state", "UNIVERSAL_DIR"]

UNIVERSAL_DIR = "universal"  # <checkpoints>/universal/<tag>: a checkpoint converted for another world size

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_PREFIX = "step"


def _tag(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, str]]:
    """``(step, tag)`` of every complete checkpoint, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for sub in ckpt_dir.iterdir():
        if sub.is_dir() and sub.name.startswith(_PREFIX) and (sub / MARKER).is_file():
            try:
                found.append((int(sub.name[len(_PREFIX):]), sub.name))
            except ValueError:
                continue
    return sorted(found)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message says why (a full disk, a read-only folder)."""


def _file_list(path: Path) -> dict[str, list[int]]:
    return {str(p.relative_to(path)): [p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != MARKER}


def verify_checkpoint(path: Path) -> str | None:
    """Why the complete checkpoint ``path`` is not usable as written (a file of its ``COMPLETE``
    marker's list is missing, or has another size or modification time), or None when it is whole.
    Markers of older grape-ds versions list no files: then only the marker is checked."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as exc:
        return f"its {MARKER} marker cannot be read ({exc})"
    for name, (size, mtime) in (marker.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing (written by the run, deleted since)"
        st = f.stat()
        if st.st_size != size:
            return f"{name} has {st.st_size} bytes, {size} when the checkpoint was written (truncated or rewritten)"
        if st.st_mtime_ns != mtime:
            return f"{name} was modified after the checkpoint was written (by another run in this directory?)"
    return None


def checkpoint_world_size(path: Path) -> int | None:
    """The number of ranks the checkpoint ``path`` was written on (its marker says; a marker of an
    older grape-ds does not, and then the ``rank<r>_state.pt`` files, one per rank, tell), or None
    when neither does."""
    try:
        world = json.loads((path / MARKER).read_text()).get("world_size")
    except (OSError, ValueError):
        world = None
    return int(world) if world else (len(list(path.glob("rank*_state.pt"))) or None)


def to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Convert the complete checkpoint ``ckpt_dir/tag`` to DeepSpeed's universal checkpoint format
    (``python -m deepspeed.checkpoint.ds_to_universal``, the converter DeepSpeed ships; ZeRO stages 1
    and 2), which any number of ranks can load with ``checkpoint.load_universal``. Written to
    ``ckpt_dir/universal/tag`` (kept until the next checkpoint is saved, and reused until then).
    Returns ``ckpt_dir/universal``.

    Raises:
        CheckpointError: the conversion failed (its output's last lines are in the message).
    """
    root = Path(ckpt_dir) / UNIVERSAL_DIR
    out = root / tag
    if (out / MARKER).is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{tag}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(Path(ckpt_dir) / tag), "--output_folder", str(tmp), "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise CheckpointError(f"converting {Path(ckpt_dir) / tag} to DeepSpeed's universal checkpoint "
                              f"failed ({tail})")
    (tmp / MARKER).write_text(json.dumps({"from": str(Path(ckpt_dir) / tag), "time": time.time()}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return root


def merged_rank_state(path: Path, old_world: int, rank: int) -> dict:
    """This rank's state after a resume on another number of ranks, from the ``rank<r>_state.pt`` of
    the ``old_world`` ranks that wrote checkpoint ``path``: rank 0 takes the sum of every old rank's
    gradient-probe sums (a round reduces them by a sum over ranks, so the round that was under way is
    unchanged); the other ranks start theirs at zero. Random generator states are not carried over
    (the caller reseeds them)."""
    if rank != 0:
        return {}
    probe = None
    for r in range(old_world):
        part = torch.load(path / f"rank{r}_state.pt", weights_only=False).get("probe")
        if part is not None:
            probe = part if probe is None else {k: probe[k] + part[k] for k in part}
    return {"probe": probe} if probe is not None else {}


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20) or "iostream error" in str(exc)
    except OSError:
        return False


class Stateful(Protocol):
    """A part of the run whose state a checkpoint carries (PyTorch's ``state_dict`` protocol)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.load_latest` loaded: the checkpoint's step and the per-rank parts this
    rank's file did not hold (left as they were built: a checkpoint of an older grape-ds, or one
    converted from another number of ranks)."""
    step: int
    missing: frozenset[str]


class Checkpointer:
    """Saves every ``every`` steps (and on demand), resumes from the newest loadable checkpoint.

    The checkpointer is given the run's stateful parts once and calls their ``state_dict`` /
    ``load_state_dict`` itself, so save and load are symmetric: ``states`` are the same on every rank
    (the loop, the sampler, the controller; rank 0's go into DeepSpeed's ``client_state``),
    ``rank_states`` are each rank's own (the probe's unreduced sums, the sampler's realised counts,
    the random generators; one ``rank<r>_state.pt`` per rank).

    Args:
        ckpt_dir: the run's checkpoint folder (``RunPaths.checkpoints``).
        every: save after every this-many-th optimizer step (<= 0: only when asked).
        keep_last: complete checkpoints kept; older ones are deleted.
        engine: the DeepSpeed engine (model, ZeRO optimizer partitions, LR scheduler).
        states / rank_states: name -> part; the names are the keys in the checkpoint.
    """

    def __init__(self, ckpt_dir: Path, every: int, keep_last: int, engine=None,
                 states: Mapping[str, Stateful] | None = None,
                 rank_states: Mapping[str, Stateful] | None = None) -> None:
        self.dir = Path(ckpt_dir)
        self.every, self.keep_last = every, keep_last
        self.engine = engine
        self.states, self.rank_states = dict(states or {}), dict(rank_states or {})
        self.last_saved: int | None = None

    @classmethod
    def from_config(cls, cfg: CheckpointConfig, ckpt_dir: Path, engine, states: Mapping[str, Stateful],
                    rank_states: Mapping[str, Stateful]) -> "Checkpointer":
        """The ``checkpoint:`` section's checkpointer of ``engine`` and the parts it saves."""
        return cls(ckpt_dir, cfg.every, cfg.keep_last, engine, states, rank_states)

    def due(self, step: int) -> bool:
        return is_due(step, self.every)

    def save(self, step: int) -> Path:
        """Save every part at optimizer step ``step``. Collective: every rank must call it at the
        same step.

        Raises:
            CheckpointError: the checkpoint could not be written (a full disk, a read-only folder).
        """
        tag = _tag(step)
        path = self.dir / tag
        if get_rank() == 0 and path.exists():  # an incomplete leftover of a crashed attempt
            shutil.rmtree(path)
        barrier()
        client_state = {name: part.state_dict() for name, part in self.states.items()}
        rank_state = {name: part.state_dict() for name, part in self.rank_states.items()}
        try:
            self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=True)
            torch.save(rank_state, path / f"rank{get_rank()}_state.pt")
        except Exception as exc:  # noqa: BLE001 - say what a full disk or a read-only folder is
            raise self._save_error(exc, step) from exc
        barrier()  # every rank's shard is on disk before the marker says so
        if get_rank() == 0:
            marker = {"step": step, "time": time.time(), "world_size": get_world_size(),
                      "files": _file_list(path)}
            (path / MARKER).write_text(json.dumps(marker) + "\n")
            self._prune()
            shutil.rmtree(self.dir / UNIVERSAL_DIR, ignore_errors=True)  # a newer checkpoint supersedes it
        barrier()
        self.last_saved = step
        return path
    def _save_error(self, exc: BaseException, step: int) -> CheckpointError:
        done = complete_checkpoints(self.dir)
        kept = (f"the newest complete checkpoint (step {done[-1][0]}) is intact and a resume starts from it"
                if done else "no earlier checkpoint exists")
        if _is_disk_full(exc, self.dir):
            try:
                free = f"{shutil.disk_usage(self.dir).free / 2**20:.1f} MiB free"
            except OSError:
                free = "free space unknown"
            return CheckpointError(f"the disk is full: saving the checkpoint of step {step} to {self.dir} failed "
                                   f"({free}); {kept}. Free some space (or lower checkpoint.keep_last) and run "
                                   "the same command again")
        return CheckpointError(f"saving the checkpoint of step {step} to {self.dir} failed "
                               f"({type(exc).__name__}: {exc}); {kept}")

    def _prune(self) -> None:
        done = complete_checkpoints(self.dir)
        for _, tag in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)

    def load_latest(self, universal: tuple[int, str, int] | None = None) -> Restored | None:
        """Load the newest complete checkpoint every rank can read into the engine and every part:
        what was loaded, or None when there is no checkpoint.

        Collective. A checkpoint that fails to load on any rank is reported and the previous one is
        tried, so all ranks always end on the same checkpoint. ``universal`` = ``(step, tag, old world
        size)``: load that checkpoint from its universal conversion (:func:`to_universal`; the engine
        was built with ``checkpoint.load_universal``) and merge the old ranks' own state
        (:func:`merged_rank_state`); it is the only candidate.

        Raises:
            CheckpointError: the universal conversion does not load.
            RuntimeError: no complete checkpoint loads.
        """
        engine = self.engine
        if universal is not None:
            step, tag, old_world = universal
            try:
                _, client_state = engine.load_checkpoint(str(self.dir / UNIVERSAL_DIR), tag=tag,
                                                         load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
                rank_state = merged_rank_state(self.dir / tag, old_world, get_rank())
                restored = self._load_parts(step, client_state, rank_state)
            except Exception as exc:  # noqa: BLE001 - no fallback across a change of world size
                raise CheckpointError(f"loading {self.dir / UNIVERSAL_DIR / tag} (checkpoint {tag} of "
                                      f"{old_world} ranks, converted) failed: {type(exc).__name__}: {exc}") from exc
            self.last_saved = None  # not a checkpoint of this world size: the end of the run saves one
            log.info("resumed from checkpoint %s of %d ranks on %d ranks (DeepSpeed universal checkpoint)",
                     self.dir / tag, old_world, get_world_size())
            return restored
        candidates = complete_checkpoints(self.dir)
        for step, tag in reversed(candidates):
            ok, client_state, rank_state, error = 1.0, None, {}, ""
            broken = verify_checkpoint(self.dir / tag)
            try:
                if broken is not None:
                    raise FileNotFoundError(f"incomplete: {broken}")
                path, client_state = engine.load_checkpoint(str(self.dir), tag=tag,
                                                            load_optimizer_states=True,
                                                            load_lr_scheduler_states=True)
                if path is None:
                    ok, error = 0.0, "DeepSpeed found no loadable files"
                else:
                    rank_state = torch.load(self.dir / tag / f"rank{get_rank()}_state.pt", weights_only=False)
            except Exception as exc:  # corrupt or truncated files: fall back to the previous one
                ok, error = 0.0, f"{type(exc).__name__}: {exc}"
            failed = all_reduce_sum(torch.tensor([1.0 - ok], device=engine.device)).item()
            if failed == 0:
                self.last_saved = step
                log.info("resumed from checkpoint %s", self.dir / tag)
                return self._load_parts(step, client_state, rank_state)
            log.warning("checkpoint %s failed to load (%s); trying the previous one", self.dir / tag,
                        error or "another rank failed")
        if candidates:
            raise RuntimeError(f"no checkpoint under {self.dir} could be loaded; "
                               "start over with --no-resume or remove the folder")
        return None

    def _load_parts(self, step: int, client_state: dict, rank_state: dict) -> Restored:
        """Every part's ``load_state_dict`` from the checkpoint of ``step`` (every shared part must be
        there; a per-rank part that is not is reported in :attr:`Restored.missing`)."""
        for name, part in self.states.items():
            part.load_state_dict(client_state[name])
        missing = set()
        for name, part in self.rank_states.items():
            if name in rank_state:
                part.load_state_dict(rank_state[name])
            else:
                missing.add(name)
        return Restored(step, frozenset(missing))


def saved_client_state(ckpt_dir: Path, tag: str) -> dict:
    """The shared parts' states saved in checkpoint ``ckpt_dir/tag`` (name -> state, as
    :meth:`Checkpointer.save` wrote them; DeepSpeed's own bookkeeping keys are there too, the module
    weights are not), read from DeepSpeed's model-states file of rank 0 without building an engine."""
    state = torch.load(Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False, mmap=True)
    state.pop("module", None)
    return state


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's full fp32 ``state_dict`` from checkpoint ``ckpt_dir/tag``, merged from every rank's
    ZeRO partition in this one process (no process group; :func:`grape_ds.engine.zero_fp32_state_dict`)."""
    from grape_ds.engine import zero_fp32_state_dict  # imports deepspeed: only when weights are read

    return zero_fp32_state_dict(Path(ckpt_dir), tag)
