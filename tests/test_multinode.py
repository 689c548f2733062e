"""Two real hosts on one machine: network namespaces on a private bridge, an sshd in each with a
throw-away key, and the ``deepspeed`` launcher reaching them with pdsh over ssh, as on a cluster
(``scripts/ci/hosts_up.sh``; recipe: shared/reference/MULTINODE_NETNS.md). Both hosts share the file
system, so one checkout and virtual environment serve both, as on a cluster with a shared home.

Shown here: ``launchers/run_hostfile.sh`` over a two-host hostfile (one rank per host) ends with the
parameters of a 2-rank localhost run; the loopback trap (a host name or master address resolving to
127.x) and unprepared hosts are refused before anything starts; killing the rank on the second host
ends the job on both hosts at once with a message naming it, and the same command then resumes.

Needs root (namespaces, sshd) and apt for openssh-server/pdsh; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.runs import REFERENCE_SETS, REPO, TINY, final_params, free_port
from grape_ds.checkpoint import complete_checkpoints
from grape_ds.launch import Host, LaunchError, check_hosts

pytestmark = pytest.mark.slow

HOSTFILE_SH = REPO / "launchers" / "run_hostfile.sh"
H1, H2 = "10.77.0.11", "10.77.0.12"  # eth1 of namespaces gds-h1 and gds-h2 (hosts_up.sh)
# the config of the session's 2-rank reference run (conftest.py), with a checkpoint every 10 steps and
# a 1-minute collective timeout (neither changes the trajectory)
SETS = [*TINY, *REFERENCE_SETS, "checkpoint.every=10", "deepspeed.timeout_minutes=1"]


def _can_make_namespaces() -> str:
    """Empty if this machine can make a network namespace, else why not."""
    if os.geteuid() != 0:
        return "two hosts on one machine need root (network namespaces, sshd)"
    if not shutil.which("ip"):
        return "no `ip` command (iproute2) to make network namespaces"
    probe = subprocess.run(["ip", "netns", "add", "gds-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"this machine cannot make network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "gds-probe"], capture_output=True)
    return ""


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """``(env, base)``: the two hosts are up; ``env`` puts the ssh wrapper first on PATH for pdsh."""
    why = _can_make_namespaces()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "HOSTS_DIR": str(base / "hosts"), "HOSTS_NETNS": "2"}
    up = subprocess.run(["bash", str(REPO / "scripts/ci/hosts_up.sh")], env=env, capture_output=True,
                        text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        env.update(PATH=f"{base / 'hosts' / 'bin'}:{env['PATH']}", PDSH_RCMD_TYPE="ssh")
        yield env, base
    finally:
        subprocess.run(["bash", str(REPO / "scripts/ci/hosts_down.sh")], env=env, capture_output=True,
                       timeout=120)


def _hostfile(base: Path, text: str) -> Path:
    path = base / f"hostfile-{abs(hash(text))}"
    path.write_text(text)
    return path


def _from_host1(env: dict, base: Path, sets: list[str], hostfile_text: str = f"{H1} slots=1\n{H2} slots=1\n",
                **knobs: str) -> list[str]:
    """``run_hostfile.sh`` as a user on the first host runs it (``ip netns exec gds-h1 ...``)."""
    hf = _hostfile(base, hostfile_text)
    knobs = {"HOSTFILE": str(hf), "MASTER_PORT": str(free_port()), "SETS": " ".join(sets), **knobs}
    return ["ip", "netns", "exec", "gds-h1", "env", *(f"{k}={v}" for k, v in knobs.items()),
            "bash", str(HOSTFILE_SH)]


def _steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.fixture(scope="module")
def two_host_run(hosts, data_cache):
    env, base = hosts
    sets = [*SETS, f"logging.output_dir={base}", f"data.cache_dir={data_cache}", "logging.run_name=two"]
    t0 = time.time()
    proc = subprocess.run(_from_host1(env, base, sets, SOCKET_IFNAME="eth1"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, base / "two", time.time() - t0


def test_two_hosts_one_rank_each_end_with_the_parameters_of_a_localhost_run(hosts, two_host_run, reference_run):
    proc, run, seconds = two_host_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    places = json.loads((run / "ranks.json").read_text())
    assert [(p["rank"], p["address"]) for p in places] == [(0, H1), (1, H2)]  # one rank on each host
    assert f"{H1}: " in out and f"{H2}: " in out  # pdsh prefixes each host's lines
    remote_env = (run / "launch" / "deepspeed_env").read_text().splitlines()
    assert {"GLOO_SOCKET_IFNAME=eth1", "DS_ACCELERATOR=cpu", "GRAPE_DS_CHECK_DEVICES=1"} <= set(remote_env)

    # the same config on one host with 2 ranks: the data order is a function of the rank, not the host
    a, b = final_params(run), final_params(reference_run)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((run / "mixture.json").read_text())["history"] == \
        json.loads((reference_run / "mixture.json").read_text())["history"]
    print(f"two-host launch, 30 steps: {seconds:.0f} s")


def test_the_loopback_trap_is_refused_before_anything_starts(hosts, data_cache):
    """Each host's name resolves to 127.0.1.1 (its /etc/hosts, as Debian and Ubuntu write it, and as in
    many containers): without a socket interface gloo would advertise that address and the job would
    die minutes later in connectFullMesh.
    With SOCKET_IFNAME the same launch works (two_host_run). A loopback master is refused too."""
    env, base = hosts
    sets = [*SETS, f"logging.output_dir={base}", f"data.cache_dir={data_cache}", "logging.run_name=trap"]
    t0 = time.time()
    proc = subprocess.run(_from_host1(env, base, sets), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and time.time() - t0 < 30, proc.stderr[-3000:]
    err = proc.stderr
    assert re.search(rf"on host '{re.escape(H2)}' the host name '\S+' resolves to 127.0.1.1", err)
    assert "Gloo connectFullMesh failed" in err and "Set SOCKET_IFNAME" in err and f"eth1 ({H2})" in err
    assert not (base / "trap" / "ranks.json").exists()  # no rank started

    proc = subprocess.run(_from_host1(env, base, sets, SOCKET_IFNAME="eth1", MASTER_ADDR="127.0.0.1"), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "the master address 127.0.0.1 is 127.0.0.1, a loopback address, but the launch spans hosts" in \
        proc.stderr and f"eth1 ({H1})" in proc.stderr

    proc = subprocess.run(_from_host1(env, base, sets, SOCKET_IFNAME="eth9"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"host '{H2}' has no interface eth9" in proc.stderr


def test_unreachable_or_unprepared_hosts_are_named_before_anything_starts(hosts, tmp_path):
    """Over real ssh, as pdsh will: a host with no sshd, a host without the checkout's folder, without
    the Python the launcher runs there, or with other grape-ds sources."""
    env, base = hosts
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "grape_ds", copy / "grape_ds", ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / "grape_ds" / "hostprobe.py").open("a") as f:
        f.write("# edited on one host only\n")
    script = f"""if True:
        import json
        from grape_ds.launch import Host, probe_hosts
        hosts = [Host("10.77.0.1", 1), Host("{H2}", 1)]
        print(json.dumps([probe_hosts(hosts),
                          probe_hosts(hosts[1:], cwd="/no/such/checkout"),
                          probe_hosts(hosts[1:], python="/no/such/venv/bin/python"),
                          probe_hosts(hosts[1:], cwd="{copy}")]))
        """
    out = subprocess.run(["ip", "netns", "exec", "gds-h1", sys.executable, "-c", script], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    everyone, no_checkout, no_python, other_sources = json.loads(out.stdout.splitlines()[-1])
    assert "is not reachable over ssh" in everyone["10.77.0.1"]["error"]  # the bridge: no sshd there
    assert everyone[H2]["interfaces"]["eth1"] == [H2] and everyone[H2]["host_addrs"] == ["127.0.1.1"]
    assert "has no folder /no/such/checkout" in no_checkout[H2]["error"]
    assert "has no Python at /no/such/venv/bin/python" in no_python[H2]["error"]
    with pytest.raises(LaunchError, match=f"host '{H2}' runs other grape-ds sources"):
        check_hosts([Host(H2, 1)], other_sources, H1, "eth1", gloo=True)
    with pytest.raises(LaunchError, match="is not reachable over ssh") as caught:
        check_hosts([Host("10.77.0.1", 1), Host(H2, 1)], everyone, H1, "eth1", gloo=True)
    assert "pdsh over passwordless ssh" in str(caught.value)


def test_killing_the_rank_on_the_second_host_ends_the_job_on_both_and_the_same_command_resumes(
        hosts, data_cache):
    env, base = hosts
    sets = [*SETS, "train.max_steps=200", f"logging.output_dir={base}", f"data.cache_dir={data_cache}",
            "logging.run_name=kill"]
    run = base / "kill"
    cmd = _from_host1(env, base, sets, SOCKET_IFNAME="eth1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while _steps(run) < 11:  # a step past the checkpoint of step 10, which the resume replays
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    rank1 = json.loads((run / "ranks.json").read_text())[1]
    assert rank1["address"] == H2
    os.kill(rank1["pid"], signal.SIGKILL)  # the namespaces share the process table
    t0 = time.time()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and time.time() - t0 < 60, out[-3000:]  # timeout_minutes=1: well within
    assert f"lost: rank 1 on {rank1['host']} ({H2}, pid {rank1['pid']})" in out
    assert re.search(rf"pdsh@\S+: {re.escape(H2)}: ssh exited with exit code", out)  # pdsh saw it end
    assert complete_checkpoints(run / "checkpoints")[-1][0] == 10
    logged = _steps(run)
    assert 11 <= logged < 16  # steps after the checkpoint, which the resume below replays
    for ns in ("gds-h1", "gds-h2"):  # nothing of the job is left on either host
        left = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        assert not [p for p in left if "grape_ds" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]

    again = subprocess.run(_from_host1(env, base, [*sets, "train.max_steps=16"], SOCKET_IFNAME="eth1"),
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert f"resumed from checkpoint {run / 'checkpoints'}/step00000010" in out
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # the steps after the checkpoint were replayed, not duplicated
