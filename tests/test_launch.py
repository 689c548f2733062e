"""Launchers: node lists, hostfiles, the pre-flight checks and dry runs of launchers/*, and real
2-rank runs through launchers/run_hostfile.sh, including a rank killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, free_port
from grape_ds.checkpoint import complete_checkpoints
from grape_ds.launch import Host, LaunchError, expand_nodelist, hostfile_text, read_hostfile

MULTI = REPO / "launchers" / "slurm_multi_node.sbatch"
HOSTFILE_SH = REPO / "launchers" / "run_hostfile.sh"


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("gpu[1-2,7],cpu9", ["gpu1", "gpu2", "gpu7", "cpu9"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
])
def test_expand_nodelist_like_scontrol(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-", "node[3-1]", "node[a-b]"])
def test_expand_nodelist_rejects_garbage(bad):
    with pytest.raises(LaunchError, match="node list"):
        expand_nodelist(bad)


def test_hostfile_round_trip_and_errors(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# comment\nnode-a slots=8\n\nnode-b slots=4  # trailing comment\n")
    hosts = read_hostfile(path)
    assert hosts == [Host("node-a", 8), Host("node-b", 4)]
    assert hostfile_text(hosts) == "node-a slots=8\nnode-b slots=4\n"
    path.write_text("node-a slots=8\nnode-b\n")
    with pytest.raises(LaunchError, match=r"hostfile:2: expected '<host> slots=<n>'"):
        read_hostfile(path)
    path.write_text("node-a slots=2\nnode-a slots=2\n")
    with pytest.raises(LaunchError, match="listed twice"):
        read_hostfile(path)
    with pytest.raises(LaunchError, match="does not exist"):
        read_hostfile(tmp_path / "missing")


def _bash(script: Path, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _section(out: str, title: str) -> list[str]:
    """The lines under ``# <title>:`` up to the next ``#`` header."""
    lines = out.splitlines()
    start = lines.index(f"# {title}:") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("# ")), len(lines))
    return lines[start:end]


@pytest.mark.parametrize("n", [2, 4])
def test_multi_node_dry_run_srun(n, tmp_path):
    proc = _bash(MULTI, "--dry-run", "--nodelist", f"node[01-{n:02d}]", "--ntasks-per-node", "8",
                 "--job-id", "4242", "--set", f"logging.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"{n} node(s) x 8 rank(s) = {8 * n}, master node01:24242, mode srun" in out
    assert _section(out, "environment")[:2] == ["export MASTER_ADDR=node01", "export MASTER_PORT=24242"]
    (cmd,) = _section(out, "commands")
    assert cmd.startswith(f"srun --kill-on-bad-exit=1 --nodes={n} --ntasks-per-node=8 --open-mode=append "
                          f"--output={tmp_path}/demo/slurm/job%j-rank%t.log bash -c ")
    assert "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec " in cmd
    assert "-m grape_ds.train --config yaml_configs/demo.yaml --set logging.output_dir=" in cmd
    assert not (tmp_path / "demo").exists()  # a dry run writes nothing


@pytest.mark.parametrize("n", [2, 4])
def test_multi_node_dry_run_deepspeed_hostfile(n, tmp_path):
    proc = _bash(MULTI, "--dry-run", "--nodelist", f"gpu[1-{n}]", "--ntasks-per-node", "4",
                 "--job-id", "7", "--set", f"logging.output_dir={tmp_path}", env={"MODE": "deepspeed"})
    assert proc.returncode == 0, proc.stderr
    assert _section(proc.stdout, "hostfile") == [f"gpu{i} slots=4" for i in range(1, n + 1)]
    (cmd,) = _section(proc.stdout, "commands")
    assert cmd.split()[1:7] == ["--hostfile", f"{tmp_path}/demo/slurm/hostfile.7", "--master_addr", "gpu1",
                                "--master_port", "20007"]
    assert cmd.split()[0].endswith("deepspeed") and "--no_ssh_check" not in cmd
    assert cmd.endswith("--module grape_ds.train --config yaml_configs/demo.yaml "
                        f"--set logging.output_dir={tmp_path}")


def test_dry_run_rejects_a_world_size_the_batch_arithmetic_does_not_allow(tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero2_fp32.json").read_text())
    ds["train_batch_size"] = 32  # 8 x 2 x 2 ranks: right for 1 node of 2 ranks, wrong for 2 nodes
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    args = ["--dry-run", "--ntasks-per-node", "2", "--job-id", "1", "--set", f"deepspeed.config={tmp_path}/ds.json"]
    assert _bash(MULTI, *args, "--nodelist", "node1").returncode == 0
    proc = _bash(MULTI, *args, "--nodelist", "node[1-2]")
    assert proc.returncode == 2
    assert "config error for world size 4" in proc.stderr and "train_batch_size=32" in proc.stderr


def _hostfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def test_unreachable_host_fails_fast_naming_it(tmp_path):
    hf = _hostfile(tmp_path, "localhost slots=1\nno-such-node.invalid slots=1\n")
    t0 = time.time()
    proc = _bash(HOSTFILE_SH, env={"HOSTFILE": str(hf), "SETS": f"logging.output_dir={tmp_path}"})
    assert proc.returncode == 2 and time.time() - t0 < 30
    assert "host 'no-such-node.invalid' from the hostfile does not resolve" in proc.stderr


def test_port_in_use_fails_fast_naming_it(tmp_path):
    hf = _hostfile(tmp_path, "localhost slots=2\n")
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _bash(HOSTFILE_SH, env={"HOSTFILE": str(hf), "MASTER_PORT": str(port),
                                       "SETS": f"logging.output_dir={tmp_path}"})
    assert proc.returncode == 2
    assert f"master port {port} on 127.0.0.1 is already in use" in proc.stderr


def _steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow
def test_hostfile_run_survives_a_killed_rank(tmp_path, data_cache):
    """SIGKILL on one rank ends the job with a non-zero exit well within the collective timeout; the same
    command then resumes from the last checkpoint and the run completes with its logs and checkpoint."""
    hf = _hostfile(tmp_path, "localhost slots=2\n")
    sets = [*TINY, "train.max_steps=200", "checkpoint.every=10", "eval.every=0", "deepspeed.timeout_minutes=1",
            f"logging.output_dir={tmp_path}", f"data.cache_dir={data_cache}", "logging.run_name=hf"]
    env = {**os.environ, "HOSTFILE": str(hf), "MASTER_PORT": str(free_port()), "SETS": " ".join(sets)}
    run = tmp_path / "hf"
    proc = subprocess.Popen(["bash", str(HOSTFILE_SH)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while _steps(run) < 14:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    import psutil  # the launch owns the deepspeed launcher's tree, in a session of its own
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "--local_rank=1" in p.cmdline() and "grape_ds.train" in p.cmdline()]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGKILL)
    t0 = time.time()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and time.time() - t0 < 60, out[-3000:]
    assert "a collective failed" in out and "another rank died" in out
    assert complete_checkpoints(run / "checkpoints")[-1][0] == 10

    env["MASTER_PORT"] = str(free_port())
    env["SETS"] = " ".join([*sets, "train.max_steps=24"])  # the same run, finished sooner
    again = subprocess.run(["bash", str(HOSTFILE_SH)], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resumed from checkpoint" in again.stdout + again.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert complete_checkpoints(run / "checkpoints")[-1][0] == 24
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # steps after the checkpoint were replayed, not duplicated


def test_the_ranks_a_launch_owns_are_the_training_processes_not_the_launchers():
    from grape_ds.launch import is_rank_command
    assert is_rank_command(["/v/bin/python", "-u", "-m", "grape_ds.train", "--local_rank=0", "--config", "c.yaml"])
    assert is_rank_command(["/v/bin/grape-ds", "train", "--config", "c.yaml"])
    assert not is_rank_command(["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=",
                                "--module", "grape_ds.train", "--config", "c.yaml"])
    assert not is_rank_command(["/v/bin/python", "/v/bin/deepspeed", "--num_gpus", "2", "--module", "grape_ds.train"])
