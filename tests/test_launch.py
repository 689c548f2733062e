"""Launchers: node lists, hostfiles, the pre-flight checks and dry runs of launchers/*, and real
2-rank runs through launchers/run_hostfile.sh, including a rank killed mid-run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from common.runs import REPO
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
    with pytest.raises(LaunchError, match=r"hostfile:2: the deepspeed launcher cannot read 'node-b'"):
        read_hostfile(path)
    path.write_text("node-a slots=8\nnode-b slots = 4\n")
    with pytest.raises(LaunchError, match=r"hostfile:2: .*'node-b slots = 4'.*no space around '=': write 'slots=N'"):
        read_hostfile(path)
    path.write_text("node-a slots=2\nnode-a slots=2\n")
    with pytest.raises(LaunchError, match="hostfile:2: host 'node-a' is listed twice"):
        read_hostfile(path)
    path.write_text("node-a slots=0\n")
    with pytest.raises(LaunchError, match=r"hostfile:1: .* no rank \(slots=0\)"):
        read_hostfile(path)
    with pytest.raises(LaunchError, match="does not exist"):
        read_hostfile(tmp_path / "missing")


@pytest.mark.parametrize("text", [
    "a slots=2\nb slots=2\n", "  a slots=2  \n\tb\tslots=1\n", "a slots=2 # four GPUs\n", "a slots=2x\n",
    "a slots=1\r\nb slots=1\r\n", "a slots=1\rb slots=1\n", "# only a comment\n  # indented\na slots=3\n",
    "a slots=1\x0cb slots=1\n", "a slots = 2\n", "a slots =2\n", "a slots= 2\n", "a  slots=2 \n", "a:slots=2\n",
    "slots=2\n", "a slots=-1\n", "a\n", "", "\n\n", "a slots=1\na slots=2\n", "#a slots=1\n", " #a slots=1\nb slots=1\n",
])
def test_the_hostfile_is_read_exactly_as_the_deepspeed_launcher_reads_it(text, tmp_path):
    """Same hosts and slots where DeepSpeed's own parser accepts the file; an error where it refuses."""
    from deepspeed.launcher.runner import fetch_hostfile
    path = tmp_path / "hostfile"
    path.write_bytes(text.encode())
    try:
        theirs = dict(fetch_hostfile(str(path)))
    except ValueError:
        theirs = None
    try:
        ours = {h.name: h.slots for h in read_hostfile(path)}
    except LaunchError:
        ours = None
    assert ours == theirs


def test_the_environment_every_host_gets(tmp_path, monkeypatch):
    """The variables a rank needs travel in .deepspeed_env (the launcher forwards only PYTHON* and a few
    others); the user's own ~/.deepspeed_env comes along, and what the launcher would choke on is named."""
    from grape_ds.launch import deepspeed_env, socket_ifname_env
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)
    env = {"HOME": str(home), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HOME": "/data/hf",
           "GRAPE_DS_CHECK_DEVICES": "1", "PATH": "/usr/bin", "SECRET_TOKEN": "x", **socket_ifname_env("eth1")}
    monkeypatch.setenv("HOME", str(home))
    (home / ".deepspeed_env").write_text("NCCL_IB_DISABLE=1\n\nLD_LIBRARY_PATH=/opt/lib\n")
    assert deepspeed_env(env) == {"NCCL_IB_DISABLE": "1", "LD_LIBRARY_PATH": "/opt/lib", "DS_ACCELERATOR": "cpu",
                                  "GLOO_SOCKET_IFNAME": "eth1", "GRAPE_DS_CHECK_DEVICES": "1", "HF_HOME": "/data/hf",
                                  "NCCL_SOCKET_IFNAME": "eth1", "OMP_NUM_THREADS": "1"}
    (tmp_path / ".deepspeed_env").write_text("FOO=1\nnot a pair\n")
    with pytest.raises(LaunchError, match=r"\.deepspeed_env:2: 'not a pair' is not NAME=value"):
        deepspeed_env(env)
    (tmp_path / ".deepspeed_env").unlink()
    with pytest.raises(LaunchError, match=r"HF_HOME='\$SCRATCH/hf' cannot reach the other hosts"):
        deepspeed_env({**env, "HF_HOME": "$SCRATCH/hf"})


@pytest.mark.parametrize("env, per_node", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4(x2)"}, 4),
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "1(x2)"}, 1),  # sbatch --nodes=2 --ntasks=2
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "8"}, 8),
    ({"SLURM_JOB_ID": "7", "SLURM_TASKS_PER_NODE": "2(x3),1"}, "uneven tasks per node .* --ntasks-per-node=N"),
    ({"SLURM_JOB_ID": "7"}, "job 7 sets neither .* submit with --ntasks-per-node=N"),
    ({}, "run inside a SLURM allocation"),
])
def test_ranks_per_node_come_from_the_allocation_or_the_message_names_the_sbatch_option(env, per_node):
    from grape_ds.launch import slurm_tasks_per_node
    if isinstance(per_node, int):
        assert slurm_tasks_per_node(None, env) == per_node
    else:
        with pytest.raises(LaunchError, match=per_node):
            slurm_tasks_per_node(None, env)


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


def test_multi_host_dry_run_prints_the_environment_every_host_gets(tmp_path):
    hf = _hostfile(tmp_path, "node-a slots=2\nnode-b slots=2\n")
    proc = _bash(HOSTFILE_SH, "--dry-run", env={"HOSTFILE": str(hf), "SOCKET_IFNAME": "ib0", "HOME": str(tmp_path),
                                                "SETS": f"logging.output_dir={tmp_path}"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# 2 host(s), 4 rank(s), master node-a:29500" in out  # a remote first host: itself, not 127.0.0.1
    env_file = f"{tmp_path}/demo/launch/deepspeed_env"
    assert f"export DS_ENV_FILE={env_file}" in _section(out, "environment")
    remote = _section(out, f"environment of the ranks on every host ({env_file})")
    assert {"GLOO_SOCKET_IFNAME=ib0", "NCCL_SOCKET_IFNAME=ib0", "DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=1"} <= set(remote)
    assert not (tmp_path / "demo").exists()  # a dry run writes nothing
    hf.write_text("node-a slots=2\nnode-b slots = 2\n")
    proc = _bash(HOSTFILE_SH, "--dry-run", env={"HOSTFILE": str(hf), "SETS": f"logging.output_dir={tmp_path}"})
    assert proc.returncode == 2 and f"{hf}:2: the deepspeed launcher cannot read 'node-b slots = 2'" in proc.stderr


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


def test_the_ranks_a_launch_owns_are_the_training_processes_not_the_launchers():
    from grape_ds.launch import is_rank_command
    assert is_rank_command(["/v/bin/python", "-u", "-m", "grape_ds.train", "--local_rank=0", "--config", "c.yaml"])
    assert is_rank_command(["/v/bin/grape-ds", "train", "--config", "c.yaml"])
    assert not is_rank_command(["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=",
                                "--module", "grape_ds.train", "--config", "c.yaml"])
    assert not is_rank_command(["/v/bin/python", "/v/bin/deepspeed", "--num_gpus", "2", "--module", "grape_ds.train"])
