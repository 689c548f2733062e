"""An exclusive lock on a folder's ``run.lock`` file that names its holder.

The holder keeps an ``fcntl.flock`` on ``<folder>/run.lock`` for as long as it lives and writes into the
file who it is (host, process id, since when, the command). The kernel drops the lock when the holding
process dies, however it dies (``kill -9`` included), so a lock left by a dead process is free: the next
one takes it over and says whose it was. A lock on a shared file system is only as good as that file
system's ``flock`` (NFSv4 and Lustre with ``-o flock`` honour it across hosts); where it is not
supported, the holder is warned and goes on unlocked.

The run directory (:class:`grape_ds.rundir.RunLock`: one live run per directory) and the packed-data
cache (:mod:`grape_ds.data.packing`: one preparation per content hash) both lock this way.
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

__all__ = ["LOCK_FILE", "LockFile", "LockBusy", "live_holder", "holder_text"]

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class LockBusy(RuntimeError):
    """Another live process holds the lock; ``holder`` is what it wrote (``host``, ``pid``, ``since``,
    ``command``; keys may be missing)."""

    def __init__(self, folder: Path, holder: dict) -> None:
        super().__init__(f"{folder} is locked by {holder_text(holder)}")
        self.folder, self.holder = Path(folder), holder


def holder_text(info: dict) -> str:
    """``host H, process id P, since YYYY-mm-dd HH:MM:SS`` of a holder record (``?`` where unknown)."""
    since = info.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"host {info.get('host', '?')}, process id {info.get('pid', '?')}, since {when}"


def live_holder(folder: Path) -> dict | None:
    """Who holds ``folder``'s lock now (``{"host", "pid", "since", "command"}``), or None when no live
    process does. Takes nothing and writes nothing."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
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


class LockFile:
    """The exclusive lock on ``<folder>/run.lock``. Use :meth:`acquire`, then :meth:`release` (a
    process that dies releases it too)."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, folder: Path) -> "LockFile":
        """Lock ``folder`` (created if needed) for this process.

        Raises:
            LockBusy: another live process holds it.
            OSError: the folder or its lock file cannot be created or opened.
        """
        folder = Path(folder)
        path = folder / LOCK_FILE
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            raise LockBusy(folder, info) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("the file system of %s does not support flock (%s): it is not locked, so do not "
                        "launch twice into it", folder, exc)
            return cls(path, fd)
        previous = _read_info(fd)
        if previous.get("pid") is not None and not previous.get("released"):
            log.warning("%s: the process that held it (%s) ended without releasing it (killed, or its host "
                        "failed); taking it over", folder, holder_text(previous))
        _write_info(fd, {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                         "command": " ".join(sys.argv)})
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
