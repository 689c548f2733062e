"""A real SLURM: two emulated nodes cn1 and cn2 (munged, slurmctld, two slurmd; Debian's packages,
installed if missing; recipe: shared/reference/SLURM_LOCAL.md) started under a temporary folder, with
an sshd answering for both names (``scripts/ci/hosts_up.sh``) so the deepspeed launcher can reach them
with pdsh. Torn down by process id.

* The single-node batch script runs 2 ranks on one node to the end.
* The multi-node script in both modes (srun: one task per rank; deepspeed: the launcher over the
  generated hostfile, pdsh over ssh), one rank per node, is signalled half-way through the batch
  shell (``scancel --batch``, as SLURM's ``--signal=B:USR1`` warning before the time limit does) and
  resubmitted: it resumes from the checkpoint it saved.
* Each ends with the parameters of the session's 2-rank reference run of the same config.
* An allocation made with ``--ntasks`` (no ``SLURM_NTASKS_PER_NODE``) gets its ranks per node derived,
  or a message naming the sbatch option to add.

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

from common.runs import REFERENCE_SETS, REPO, TINY, final_params
from grape_ds.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow

SINGLE = REPO / "launchers" / "slurm_single_node.sbatch"
MULTI = REPO / "launchers" / "slurm_multi_node.sbatch"
# one rank per node on the CPU nodes (the script's #SBATCH lines are for GPU nodes)
MULTI_OPTS = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00"]
SETS = [*TINY, *REFERENCE_SETS]  # the config of the session's reference run (conftest.py)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0 or not (shutil.which("sbatch") or shutil.which("apt-get")):
        pytest.skip("a local SLURM cluster needs root and apt-get (or SLURM already installed)")
    base = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(base / "cluster"), "SLURM_NODES": "2",
           "HOSTS_DIR": str(base / "hosts"), "HOSTS_NETNS": "0", "HOSTS_LOOPBACK": "cn1 cn2"}
    try:
        for script in ("slurm_up.sh", "hosts_up.sh"):
            up = subprocess.run(["bash", str(REPO / "scripts/ci" / script)], env=env, capture_output=True,
                                text=True, timeout=600)
            assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        env.update(SLURM_CONF=str(base / "cluster" / "etc" / "slurm.conf"), PDSH_RCMD_TYPE="ssh",
                   PATH=f"{base / 'hosts' / 'bin'}:{env['PATH']}")  # the ssh wrapper, for pdsh
        yield env, base
    finally:
        for script in ("slurm_down.sh", "hosts_down.sh"):
            subprocess.run(["bash", str(REPO / "scripts/ci" / script)], env=env, capture_output=True, timeout=120)


def _submit(env: dict, base: Path, sets: list[str], script: Path = SINGLE, opts: tuple[str, ...] = (),
            **knobs: str) -> int:
    job_env = {**env, "PYTHON": sys.executable, "CONFIG": "yaml_configs/demo.yaml", "SETS": " ".join(sets),
               **knobs}
    out = subprocess.run(["sbatch", "--parsable", f"--output={base}/slurm-%j.out", *opts, str(script)],
                         cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
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


def _log(base: Path, job_id: int) -> str:
    path = base / f"slurm-{job_id}.out"
    return path.read_text()[-4000:] if path.exists() else "(no batch log)"


@pytest.fixture(scope="module")
def full_run(slurm, data_cache):
    env, base = slurm
    sets = [*SETS, f"logging.output_dir={base}", f"data.cache_dir={data_cache}", "logging.run_name=full"]
    job_id = _submit(env, base, sets)
    return job_id, _wait(env, job_id), base / "full"


def test_single_node_sbatch_runs_two_ranks_to_the_end(slurm, full_run, reference_run):
    env, base = slurm
    job_id, job, run = full_run
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), _log(base, job_id)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 4 * 2 * 2  # 2 ranks
    assert sorted(p.name for p in (run / "slurm").glob("*.log")) == [f"job{job_id}-rank0.log",
                                                                      f"job{job_id}-rank1.log"]
    assert [p["slurm_node"] for p in json.loads((run / "ranks.json").read_text())] == ["cn1", "cn1"]
    assert _steps(run) == 30 and list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert [c[0] for c in complete_checkpoints(run / "checkpoints")] == [30]
    a, b = final_params(run), final_params(reference_run)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("mode", ["srun", "deepspeed"])
def test_multi_node_job_stopped_by_scancel_and_resubmitted_ends_with_the_reference_parameters(
        slurm, reference_run, data_cache, mode):
    """One rank on each of two nodes; the signal goes to the batch shell, python -m grape_ds.launch.
    srun mode: SIGUSR1 (the time-limit warning), which the launch passes to srun and srun to every
    task. deepspeed mode: SIGTERM (a preemption), which the launch passes over ssh to the ranks pdsh
    started under each node's sshd, outside the job's steps."""
    env, base = slurm
    sets = [*SETS, f"logging.output_dir={base}", f"data.cache_dir={data_cache}", f"logging.run_name={mode}"]
    run = base / mode
    first = _submit(env, base, sets, MULTI, MULTI_OPTS, MODE=mode, REQUEUE="0")  # resubmitted by hand below
    deadline = time.time() + 240
    while _steps(run) < 8:
        assert time.time() < deadline and _job(env, first).get("JobState") in ("PENDING", "RUNNING"), \
            _log(base, first)
        time.sleep(0.2)
    sig = "USR1" if mode == "srun" else "TERM"
    subprocess.run(["scancel", "--batch", f"--signal={sig}", str(first)], env=env, check=True, timeout=30)
    job = _wait(env, first)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), _log(base, first)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] == f"SIG{sig}", status
    stopped = status["step"]
    assert 8 <= stopped < 30 and [c[0] for c in complete_checkpoints(run / "checkpoints")] == [stopped]

    second = _submit(env, base, sets, MULTI, MULTI_OPTS, MODE=mode, REQUEUE="0")
    job = _wait(env, second)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), _log(base, second)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    if mode == "srun":
        log = (run / "slurm" / f"job{second}-rank0.log").read_text()
        nodes = [p["slurm_node"] for p in json.loads((run / "ranks.json").read_text())]
        assert nodes == ["cn1", "cn2"]  # one rank on each node
    else:
        log = (base / f"slurm-{second}.out").read_text()
        assert "global_rank_mapping=defaultdict(<class 'list'>, {'cn1': [0], 'cn2': [1]})" in log
        assert re.search(r"^cn2: .*Process \d+ exits successfully", log, re.M)  # pdsh ran a rank on cn2
    assert f"resumed from checkpoint {run / 'checkpoints'}/step{stopped:08d}" in log
    a, b = final_params(run), final_params(reference_run)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    history = json.loads((run / "mixture.json").read_text())["history"]
    assert history == json.loads((reference_run / "mixture.json").read_text())["history"]


def test_an_allocation_made_with_ntasks_gets_its_ranks_per_node_derived_or_named(slurm, tmp_path):
    """``--nodes=2 --ntasks=2`` sets no SLURM_NTASKS_PER_NODE: the launch derives 1 per node from
    SLURM_TASKS_PER_NODE; uneven tasks (3 over 2 nodes) name the sbatch option to use instead."""
    env, base = slurm
    plan = f"{sys.executable} -m grape_ds.launch slurm --dry-run --config yaml_configs/demo.yaml " \
           f"--set logging.output_dir={tmp_path}"
    for ntasks, want in ((2, "SLURM job {job}: 2 node(s) x 1 rank(s) = 2"),
                         (3, "SLURM job {job} has uneven tasks per node (SLURM_TASKS_PER_NODE=2,1)")):
        out = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--ntasks={ntasks}", f"--chdir={REPO}",
                              f"--output={tmp_path}/ntasks{ntasks}.out", "--wrap", plan], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        job_id = int(out.stdout.strip().split(";")[0])
        job = _wait(env, job_id, timeout=120)
        text = (tmp_path / f"ntasks{ntasks}.out").read_text()
        assert want.format(job=job_id) in text, text[-2000:]
        assert job["ExitCode"] == ("0:0" if ntasks == 2 else "2:0") and "run inside a SLURM allocation" not in text


def test_the_prepare_job_packs_the_data_that_training_then_finds(slurm, tmp_path):
    """Step 1 of the two-step flow: launchers/slurm_prepare.sbatch (one task, --num-proc = its CPUs)
    packs the demo's data into a fresh cache; the same data settings then find it complete (step 2,
    training on it, is every other test here: they train on a prepared cache)."""
    env, base = slurm
    cache = tmp_path / "cache"
    out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", f"--output={tmp_path}/prepare-%j.out",
                          str(REPO / "launchers" / "slurm_prepare.sbatch")], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={**env, "PYTHON": sys.executable, "SETS": f"data.cache_dir={cache}"})
    assert out.returncode == 0, out.stderr
    job_id = int(out.stdout.strip().split(";")[0])
    job = _wait(env, job_id, timeout=300)
    log = (tmp_path / f"prepare-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "holds 9 units" in log
    (manifest,) = (cache / "packed").glob("*/manifest.json")
    from grape_ds.config import load_config
    from grape_ds.data import prepare_data
    assert prepare_data(load_config(REPO / "yaml_configs" / "demo.yaml",
                                    [f"data.cache_dir={cache}"]).data).root == manifest.parent
