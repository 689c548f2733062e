"""The run directory: one live run at a time, and what a resume may change.

**The lock.** Rank 0 of a run holds an exclusive ``fcntl.flock`` on ``<run>/run.lock`` for as long as
the run lives, and writes into it who holds it (host, process id, since when, the command). A second
launch into the same directory (another terminal, a requeued job overlapping the old one, another
master port) is refused at once with that holder named, before it reads or writes anything else of the
run. The kernel drops the lock when the holding process dies, however it dies (``kill -9`` included),
so a lock left by a dead run is free: the next launch takes it over and says whose it was. A lock on a
shared file system is only as good as that file system's ``flock`` (NFSv4 and Lustre with ``-o flock``
honour it across hosts); where it is not supported, the run warns and goes on unlocked.

**Resuming after a change.** Before any state is loaded or any file of the run is written,
:func:`resume_changes` compares the config a relaunch resolves with the run's saved ``config.yaml``
(and its ``ds_config.json``, which fixes the world size the checkpoints were written on). Keys that only
change how the run is watched or how long it goes on (:data:`RESUMABLE`) may change, and so may the
number of ranks when the global batch stays the same (the checkpoint is then converted to DeepSpeed's
universal format); any other change is refused with every changed key, its old and new value, and
what the user can do.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import yaml

__all__ = ["RunDirError", "RunDirBusy", "RunLock", "LOCK_FILE", "RESUMABLE", "BATCH_KEYS", "resume_changes",
           "saved_world_size", "saved_global_batch", "flatten", "live_holder", "check_writable", "refused_message"]

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"

# Keys a resumed run may change: how it is watched, evaluated and checkpointed, how long it runs,
# where its caches and outputs live, and the collective timeout. ``train.max_steps`` also moves the LR
# schedule's horizon (the steps already taken keep their learning rate).
RESUMABLE = ("train.max_steps", "eval.", "checkpoint.every", "checkpoint.keep_last", "checkpoint.resume",
             "logging.every", "logging.progress", "logging.output_dir", "logging.run_name",
             "logging.trace_batches", "deepspeed.timeout_minutes", "data.cache_dir", "deepspeed.config")


class RunDirError(ValueError):
    """A run directory cannot be used as asked; the message says why and what to do."""


class RunDirBusy(RunDirError):
    """Another live process holds the run directory's lock."""


def _holder_text(info: dict) -> str:
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"host {info.get('host', '?')}, process id {info.get('pid', '?')}, since {when}"


def check_writable(run_dir: Path) -> None:
    """The run directory, or the nearest folder above it that exists, must be writable.

    Raises:
        RunDirError: it is not (read-only file system, permissions), or a file stands in its way.
    """
    path = Path(run_dir)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(f"run directory {run_dir}: {probe} is a file, not a folder; choose another "
                          "logging.output_dir / logging.run_name")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {run_dir}: {probe} is not writable (read-only file system or "
                          "permissions); set logging.output_dir to a folder you can write")


def live_holder(run_dir: Path) -> dict | None:
    """Who holds ``run_dir``'s lock now (``{"host", "pid", "since", "command"}``), or None when no live
    process does. Takes nothing and writes nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_info(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


class RunLock:
    """The exclusive lock on ``<run>/run.lock`` (rank 0 only). Use :meth:`acquire`, then
    :meth:`release` when the run ends (a process that dies releases it too)."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Lock ``run_dir`` (created if needed) for this process.

        Raises:
            RunDirBusy: another live process holds it; the message names its host, process id and
                start time.
        """
        run_dir = Path(run_dir)
        check_writable(run_dir)
        path = run_dir / LOCK_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"run directory {run_dir}: cannot create {path} ({exc.strerror}); set "
                              "logging.output_dir to a folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            raise RunDirBusy(
                f"run directory {run_dir} is in use by a live run ({_holder_text(info)}); "
                f"its command: {info.get('command', '?')}. Wait for it to end, stop it (kill -TERM "
                f"{info.get('pid', '<pid>')} on {info.get('host', 'its host')} saves a checkpoint first), "
                "or launch into another logging.run_name") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("the file system of %s does not support flock (%s): the run directory is not "
                        "locked, so do not launch twice into it", run_dir, exc)
            return cls(path, fd)
        previous = _read_info(fd)
        if previous.get("pid") is not None and not previous.get("released"):
            log.warning("run directory %s: the run that held it (%s) ended without releasing it "
                        "(killed, or its host failed); taking it over", run_dir, _holder_text(previous))
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                "command": " ".join(sys.argv)}
        _write_info(fd, info)
        return cls(path, fd)

    def release(self) -> None:
        """Mark the lock released and drop it (idempotent)."""
        if self._fd is None:
            return
        try:
            info = _read_info(self._fd)
            _write_info(self._fd, {**info, "released": time.time()})
        except OSError as exc:  # a full or read-only disk: closing below still drops the lock
            log.warning("could not mark %s released (%s); the lock itself is dropped", self.path, exc)
        os.close(self._fd)
        self._fd = None


def _read_info(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = b""
    while chunk := os.read(fd, 65536):
        text += chunk
    try:
        info = json.loads(text.decode("utf-8", errors="replace") or "{}")
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def _write_info(fd: int, info: dict) -> None:
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


# ----------------------------------------------------------------------------------------------
# Resume compatibility
# ----------------------------------------------------------------------------------------------

def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def saved_world_size(run_dir: Path) -> int | None:
    """The number of ranks the run was launched on, from its ``ds_config.json`` (None: not there)."""
    path = Path(run_dir) / "ds_config.json"
    try:
        ds = json.loads(path.read_text())
        return int(ds["train_batch_size"]) // (int(ds["train_micro_batch_size_per_gpu"])
                                               * int(ds["gradient_accumulation_steps"]))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


# On another number of ranks a resume keeps the global batch: these may change with the world size
# as long as micro_batch_size x gradient_accumulation_steps x ranks stays what it was.
BATCH_KEYS = ("train.micro_batch_size", "train.gradient_accumulation_steps")


def saved_global_batch(run_dir: Path) -> int | None:
    """Sequences per optimizer step the run trained with (``train_batch_size`` of its ``ds_config.json``)."""
    try:
        return int(json.loads((Path(run_dir) / "ds_config.json").read_text())["train_batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_changes(run_dir: Path, new: dict, world_size: int, global_batch: int | None = None,
                   checkpoint_world: int | None = None) -> tuple[list[str], list[str]]:
    """Compare a relaunch's resolved config (``config_to_dict``) and world size with the run's saved
    ones: ``(allowed, refused)`` changes, each ``"key: old -> new"``. Empty lists when nothing changed
    or the run has no saved config.

    ``checkpoint_world`` is the number of ranks the checkpoint to resume was written on (None: the
    run's ``ds_config.json`` says). Another world size is allowed when the global batch
    (``global_batch``, sequences per optimizer step) stays the run's; then ``train.micro_batch_size`` and ``train.gradient_accumulation_steps``
    may change too. Otherwise the refusal says which values keep it.

    Raises:
        RunDirError: the saved ``config.yaml`` cannot be read.
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return [], []
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RunDirError(f"{path}: cannot read the run's saved config ({exc}); move the run directory "
                          "away or start over with --no-resume") from None
    before, after = flatten(old), flatten(new)
    old_batch = saved_global_batch(run_dir)
    batch_kept = global_batch is not None and old_batch == global_batch
    allowed, refused = [], []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, "<absent>"), after.get(key, "<absent>")
        if a == b:
            continue
        ok = _resumable(key) or (key in BATCH_KEYS and batch_kept)
        (allowed if ok else refused).append(f"{key}: {a!r} -> {b!r}")
    old_world = checkpoint_world if checkpoint_world is not None else saved_world_size(run_dir)
    if old_world is not None and old_world != world_size:
        change = f"world size: {old_world} ranks -> {world_size} ranks"
        if batch_kept:
            allowed.append(change + " (the checkpoint is converted to DeepSpeed's universal format)")
        else:
            micro = after.get("train.micro_batch_size")
            hint = ""
            if old_batch and isinstance(micro, int) and old_batch % (micro * world_size) == 0:
                hint = (f"; on {world_size} ranks with train.micro_batch_size={micro}, set "
                        f"train.gradient_accumulation_steps={old_batch // (micro * world_size)}")
            refused.append(f"{change}, which changes the global batch from {old_batch} to {global_batch} "
                           f"sequences per step (micro_batch_size x gradient_accumulation_steps x ranks); "
                           f"keep it at {old_batch}{hint}")
    return allowed, refused


def refused_message(run_dir: Path, refused: list[str]) -> str:
    """The error for a resume whose config changed in ways the checkpoint cannot follow."""
    lines = [f"cannot resume {run_dir}: the config differs from the one its checkpoints were written "
             "with, in keys a checkpoint cannot follow:"]
    lines += [f"  {c}" for c in refused]
    what = ("put those values back to resume this run, or start a new run: another logging.run_name (the "
            "old run stays as it is), or --no-resume (the old run is moved aside to <run>.replaced-<time>, "
            "never deleted).")
    return "\n".join(lines + ["What you can do: " + what])
