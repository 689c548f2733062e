"""Shared fixtures: environment for DeepSpeed on CPU, a shared packed-data cache, and a launcher
helper that runs real ranks through the ``deepspeed`` launcher.

Every training process the tests start runs under grape-ds's device check
(``GRAPE_DS_CHECK_DEVICES=1``, grape_ds/devices.py): a tensor grape-ds creates without naming its
device lands on ``meta`` and fails at its first use, as a CPU tensor fails under NCCL on a GPU.
``launch(..., strict_devices=True)`` also refuses any operation that mixes devices (slower).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grape_ds.distributed import free_port  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "yaml_configs" / "demo.yaml"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("GRAPE_DS_CHECK_DEVICES", "1")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One packed-data cache for the whole session: the planted corpus is packed once."""
    return tmp_path_factory.mktemp("data_cache")


# A tiny, fast run on the planted corpus; tests add their own overrides on top.
TINY = [
    "train.max_steps=40", "train.warmup_steps=4", "train.micro_batch_size=4",
    "train.gradient_accumulation_steps=2", "eval.every=20", "eval.max_windows=32",
    "checkpoint.every=20", "logging.every=5", "logging.progress=false",
]


def launch(run_root: Path, cache: Path, overrides=(), args=(), world_size: int = 2,
           timeout: float = 300, check: bool = True, config: Path = DEMO,
           strict_devices: bool = False) -> subprocess.CompletedProcess:
    """Run ``grape_ds.train`` with ``world_size`` ranks under the real ``deepspeed`` launcher. The demo
    config is shrunk with ``TINY``; another config runs with its own values."""
    tiny = TINY if Path(config) == DEMO else []
    sets = [*tiny, f"logging.output_dir={run_root}", f"data.cache_dir={cache}", *overrides]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world_size),
           "--master_port", str(free_port()), "--module", "grape_ds.train", "--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    cmd += list(args)
    env = {**os.environ, **({"GRAPE_DS_CHECK_DEVICES": "strict"} if strict_devices else {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"launch failed with exit code {proc.returncode}:\n{tail}")
    return proc


# The uninterrupted 2-rank run that stopped, resumed, moved and multi-host runs of the same config are
# compared with (tests/test_preempt.py, test_slurm.py, test_multinode.py): TINY plus these.
REFERENCE_SETS = ["train.max_steps=30", "checkpoint.every=0", "eval.every=0", "mixture.every=10",
                  "logging.trace_batches=false"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, data_cache) -> Path:
    """``REFERENCE_SETS`` on 2 ranks of this host under the deepspeed launcher, run once per session."""
    root = tmp_path_factory.mktemp("reference")
    launch(root, data_cache, [*REFERENCE_SETS, "logging.run_name=reference"])
    return root / "reference"


def final_params(run: Path) -> dict:
    """The fp32 parameters of a run's newest complete checkpoint (merged from its ZeRO shards)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from grape_ds.checkpoint import complete_checkpoints
    ckpt = run / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=complete_checkpoints(ckpt)[-1][1])
