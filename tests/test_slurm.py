"""A real SLURM: a one-node cluster (munged, slurmctld, slurmd; Debian's packages, installed if missing)
started under a temporary folder, the single-node batch script submitted to it, and torn down by
process id. Then a job stopped half-way with ``scancel --signal=TERM`` and resubmitted: it resumes
from the checkpoint it saved and ends with the uninterrupted run's parameters.

Needs root and apt (the CI machines have both); elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY
from grape_ds.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow

SCRIPT = REPO / "launchers" / "slurm_single_node.sbatch"
SETS = [*TINY, "train.max_steps=60", "checkpoint.every=0", "eval.every=0", "mixture.every=10",
        "logging.trace_batches=false"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0 or not (shutil.which("sbatch") or shutil.which("apt-get")):
        pytest.skip("a local SLURM cluster needs root and apt-get (or SLURM already installed)")
    base = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(base / "cluster")}
    up = subprocess.run(["bash", str(REPO / "scripts/ci/slurm_up.sh")], env=env, capture_output=True,
                        text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        env["SLURM_CONF"] = str(base / "cluster" / "etc" / "slurm.conf")
        yield env, base
    finally:
        subprocess.run(["bash", str(REPO / "scripts/ci/slurm_down.sh")], env=env, capture_output=True,
                       timeout=120)


def _submit(env: dict, base: Path, sets: list[str], **knobs: str) -> int:
    job_env = {**env, "PYTHON": sys.executable, "CONFIG": "yaml_configs/demo.yaml", "SETS": " ".join(sets),
               **knobs}
    out = subprocess.run(["sbatch", "--parsable", f"--output={base}/slurm-%j.out", str(SCRIPT)], cwd=REPO,
                         env=job_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().split(";")[0])


def _job(env: dict, job_id: int) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", str(job_id)], env=env, capture_output=True, text=True,
                          timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _wait(env: dict, job_id: int, timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", str(job_id)], env=env, capture_output=True, text=True,
                         timeout=30).stdout.strip():
        if time.time() > deadline:
            subprocess.run(["scancel", str(job_id)], env=env, timeout=30)
            pytest.fail(f"job {job_id} still queued/running after {timeout}s")
        time.sleep(0.5)
    return _job(env, job_id)


def _steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def _params(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = run / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=complete_checkpoints(ckpt)[-1][1])


def _log(base: Path, job_id: int) -> str:
    path = base / f"slurm-{job_id}.out"
    return path.read_text()[-4000:] if path.exists() else "(no batch log)"


@pytest.fixture(scope="module")
def full_run(slurm, data_cache):
    env, base = slurm
    sets = [*SETS, f"logging.output_dir={base}", f"data.cache_dir={data_cache}", "logging.run_name=full"]
    job_id = _submit(env, base, sets)
    return job_id, _wait(env, job_id), base / "full"


def test_single_node_sbatch_runs_two_ranks_to_the_end(slurm, full_run):
    env, base = slurm
    job_id, job, run = full_run
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), _log(base, job_id)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 4 * 2 * 2  # 2 ranks
    assert sorted(p.name for p in (run / "slurm").glob("*.log")) == [f"job{job_id}-rank0.log",
                                                                      f"job{job_id}-rank1.log"]
    assert _steps(run) == 60 and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [c[0] for c in complete_checkpoints(run / "checkpoints")] == [60]


def test_sigterm_then_resubmit_resumes_to_the_same_parameters(slurm, full_run, data_cache):
    env, base = slurm
    sets = [*SETS, f"logging.output_dir={base}", f"data.cache_dir={data_cache}", "logging.run_name=pre"]
    run = base / "pre"
    first = _submit(env, base, sets, REQUEUE="0")  # resubmitted by hand below
    deadline = time.time() + 240
    while _steps(run) < 8:
        assert time.time() < deadline and _job(env, first).get("JobState") in ("PENDING", "RUNNING"), \
            _log(base, first)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", str(first)], env=env, check=True, timeout=30)
    job = _wait(env, first)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), _log(base, first)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] == "SIGTERM", status
    stopped = status["step"]
    assert 8 <= stopped < 60 and [c[0] for c in complete_checkpoints(run / "checkpoints")] == [stopped]

    second = _submit(env, base, sets, REQUEUE="0")
    job = _wait(env, second)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), _log(base, second)
    rank0 = (run / "slurm" / f"job{second}-rank0.log").read_text()
    assert f"resumed from checkpoint {run / 'checkpoints'}/step{stopped:08d}" in rank0
    a, b = _params(run), _params(full_run[2])
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    history = json.loads((run / "mixture.json").read_text())["history"]
    assert history == json.loads((full_run[2] / "mixture.json").read_text())["history"]
