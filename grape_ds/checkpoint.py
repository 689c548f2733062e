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
import shutil
import time
from pathlib import Path

import torch

from grape_ds.distributed import all_reduce_sum, barrier, get_rank

__all__ = ["Checkpointer", "CheckpointError", "complete_checkpoints", "verify_checkpoint", "MARKER"]

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


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20) or "iostream error" in str(exc)
    except OSError:
        return False


class Checkpointer:
    """Saves every ``every`` steps (and on demand), resumes from the newest loadable checkpoint."""

    def __init__(self, ckpt_dir: Path, every: int, keep_last: int) -> None:
        self.dir = Path(ckpt_dir)
        self.every, self.keep_last = every, keep_last
        self.last_saved: int | None = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, engine, step: int, client_state: dict, rank_state: dict | None = None) -> Path:
        """Collective: every rank must call it at the same step."""
        tag = _tag(step)
        path = self.dir / tag
        if get_rank() == 0 and path.exists():  # an incomplete leftover of a crashed attempt
            shutil.rmtree(path)
        barrier()
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=True)
            torch.save(rank_state or {}, path / f"rank{get_rank()}_state.pt")
        except Exception as exc:  # noqa: BLE001 - say what a full disk or a read-only folder is
            raise self._save_error(exc, step) from exc
        barrier()  # every rank's shard is on disk before the marker says so
        if get_rank() == 0:
            marker = {"step": step, "time": time.time(), "files": _file_list(path)}
            (path / MARKER).write_text(json.dumps(marker) + "\n")
            self._prune()
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

    def load_latest(self, engine) -> tuple[dict, dict] | None:
        """Load the newest complete checkpoint every rank can read: (client state, this rank's
        state), or None when there is no checkpoint.

        Collective. A checkpoint that fails to load on any rank is reported and the previous one is
        tried, so all ranks always end on the same checkpoint.
        """
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
                return client_state, rank_state
            log.warning("checkpoint %s failed to load (%s); trying the previous one", self.dir / tag,
                        error or "another rank failed")
        if candidates:
            raise RuntimeError(f"no checkpoint under {self.dir} could be loaded; "
                               "start over with --no-resume or remove the folder")
        return None
