"""Pytest fixtures and the environment every test runs in: DeepSpeed on the CPU, a shared packed-data
cache, and the session's reference run. Helpers the tests import live in ``tests/common/`` (``launch``
and ``run_ranks`` in ``common/runs.py`` start real ranks the way the ``deepspeed`` launcher does).

Tiers (markers in setup.cfg):

- ``make test-fast`` (``-m "not gpu and not slow"``, under 2 minutes on 2 cores): unit and
  single-process tests, what a developer runs after every edit; the CLI is called in-process, the
  launcher scripts only in dry runs.
- ``make test`` (``-m "not gpu"``, under 15 minutes): adds ``slow``, the real multi-process runs
  (2 real ranks on gloo, the launcher scripts, stop/resume, the GPU check's CPU mode) and the model
  trained to a figure (the planted learning check). Runs that several modules only read are made once
  per session here (``data_cache``, ``reference_run``).
- ``gpu``: needs a CUDA device; never run on the CPU machines.

Every training process the tests start runs under grape-ds's device check
(``GRAPE_DS_CHECK_DEVICES=1``, grape_ds/devices.py): a tensor grape-ds creates without naming its
device lands on ``meta`` and fails at its first use, as a CPU tensor fails under NCCL on a GPU.
``launch(..., strict_devices=True)`` also refuses any operation that mixes devices (slower).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("GRAPE_DS_CHECK_DEVICES", "1")

from common.runs import REFERENCE_SETS, launch  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One packed-data cache for the whole session: the planted corpus is packed once."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, data_cache) -> Path:
    """``REFERENCE_SETS`` on 2 ranks of this host (:func:`launch`), run once per session."""
    root = tmp_path_factory.mktemp("reference")
    launch(root, data_cache, [*REFERENCE_SETS, "logging.run_name=reference"])
    return root / "reference"
