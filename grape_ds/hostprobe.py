"""What one host of a multi-host launch offers, printed as one JSON line; run there over ssh by the
launch pre-flight (:func:`grape_ds.launch.probe_hosts`) as ``<python> -m grape_ds.hostprobe``, from the
checkout the ranks will run in. Imports nothing heavy (no torch): it answers in well under a second.

Fields: ``host`` (the host name), ``host_addrs`` (the IPv4 addresses that name resolves to: what gloo
advertises to the other ranks when no socket interface is set), ``interfaces`` (name -> IPv4
addresses), ``python`` (``sys.executable``), ``sources`` (:func:`source_digest` of this checkout),
``deepspeed`` (whether it can be imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import sys
from pathlib import Path


def source_digest(root: Path | None = None) -> str:
    """SHA-256 over the relative paths and bytes of every ``grape_ds/**/*.py`` (sorted): two hosts
    with the same digest run the same code."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def interfaces() -> dict[str, list[str]]:
    """Network interfaces with their IPv4 addresses (``lo`` included)."""
    import psutil
    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def host_addrs() -> list[str]:
    try:
        return socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        return []


def probe() -> dict:
    return {"host": socket.gethostname(), "host_addrs": host_addrs(), "interfaces": interfaces(),
            "python": sys.executable, "sources": source_digest(),
            "deepspeed": importlib.util.find_spec("deepspeed") is not None}


if __name__ == "__main__":
    print("GRAPE_DS_PROBE " + json.dumps(probe()), flush=True)
