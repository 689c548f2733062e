"""Safe runs with real ranks (2, gloo; the first under the ``deepspeed`` launcher): a second launch into a live
run is refused by name and changes nothing; a resume with a changed model or world size is refused
before anything is loaded or written; a stop signal saves and exits 0; an evaluation that fails
leaves the final checkpoint and ``status.json`` and never makes the run unfinishable."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.runs import DEMO, REPO, TINY, free_port, launch
from grape_ds.checkpoint import complete_checkpoints
from grape_ds.launch import train_command
from grape_ds.lockfile import live_holder

pytestmark = pytest.mark.slow

LONG = ["train.max_steps=400", "checkpoint.every=0", "eval.every=0", "logging.every=1", "logging.run_name=busy"]


def _steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _files(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != "run.lock"}


def test_one_live_run_per_directory_a_clean_stop_and_a_refused_resume(tmp_path, data_cache):
    port = free_port()
    # as launchers/run_local.sh starts a run: the deepspeed launcher under a process that owns its tree
    runner = [sys.executable, "-m", "grape_ds.launch", "own", "--", str(Path(sys.executable).parent / "deepspeed"),
              "--num_gpus", "2", "--master_port", str(port)]
    cmd = train_command(DEMO, [*TINY, *LONG, f"logging.output_dir={tmp_path}", f"data.cache_dir={data_cache}"],
                        launcher=runner)
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    run = tmp_path / "busy"
    deadline = time.time() + 240
    while len(_steps(run)) < 3:
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.2)
    holder = json.loads((run / "run.lock").read_text())
    config = (run / "config.yaml").read_bytes()

    # a second launch (another seed, another master port) into the live run: refused at once, by name
    second = launch(tmp_path, data_cache, [*LONG, "train.seed=7"], check=False, timeout=180)
    said = " ".join((second.stdout + second.stderr).split())
    assert second.returncode == 2, said[-3000:]
    assert "terminate called" not in said  # left its process group before exiting
    assert (f"is in use by a live run (host {socket.gethostname()}, process id {holder['pid']}, since"
            in said), said[-3000:]
    assert (run / "config.yaml").read_bytes() == config
    assert first.poll() is None  # the first run goes on

    # one SIGTERM to the command that started the job, as a scheduler sends it: every rank saves a
    # checkpoint at the next step boundary and the command exits 0
    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 0, out[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] == "SIGTERM"
    steps = _steps(run)
    assert steps == list(range(1, status["step"] + 1))  # one row per step: nobody else wrote here
    assert complete_checkpoints(run / "checkpoints")[-1][0] == status["step"]
    assert live_holder(run) is None and json.loads((run / "run.lock").read_text())["released"]
    assert "terminate called" not in out
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # no op, no leak

    # resuming with another model on another number of ranks: refused before anything is touched
    before = _files(run)
    changed = launch(tmp_path, data_cache, [*LONG, "model.n_layer=3"], world_size=1, check=False, timeout=180)
    said = " ".join((changed.stdout + changed.stderr).split())
    assert changed.returncode == 2, said[-3000:]
    assert "model.n_layer: 2 -> 3" in said and "world size: 2 ranks -> 1 ranks" in said, said[-3000:]
    assert "Traceback" not in said and "terminate called" not in said
    assert _files(run) == before


def test_an_evaluation_error_leaves_the_final_checkpoint_and_the_run_finishes(tmp_path, data_cache):
    """The final evaluation raises (injected into one rank of a 1-rank run): the final checkpoint and
    status.json are written, eval.jsonl records the error, and running the same command again
    resumes and finishes instead of failing at the same place."""
    inject = ("import sys; import grape_ds.evaluation as e\n"
              "def broken(self, model, step):\n"
              "    raise ValueError('the item 7 of task_1 cannot be scored')\n"
              "e.Evaluator.evaluate = broken\n"
              "from grape_ds.train import main; sys.exit(main(sys.argv[1:]))\n")
    argv = ["--config", str(DEMO)]
    for s in [*TINY, "train.max_steps=6", "eval.every=0", "checkpoint.every=0", "mixture.every=3",
              f"logging.output_dir={tmp_path}", f"data.cache_dir={data_cache}", "logging.run_name=evalfail"]:
        argv += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    run = tmp_path / "evalfail"
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-c", inject, *argv], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
        assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [6]
        rows = [json.loads(line) for line in (run / "eval" / "eval.jsonl").read_text().splitlines()]
        assert rows[-1] == {"step": 6, "error": "ValueError: the item 7 of task_1 cannot be scored"}
        assert len(rows) == attempt + 1
        assert "evaluation at step 6 failed, training goes on" in proc.stderr


def test_bad_data_found_after_launch_is_one_message_and_the_job_ends(tmp_path):
    """Launched without the pre-flight, an empty domain stops the rank that packs with one message
    (exit 2); the waiting rank is stopped by the launcher at once (no stop handler is installed
    before training starts), instead of ignoring its SIGTERM."""
    from test_safe_runs import Census, _jsonl
    census = Census(tmp_path)
    config = census.units("emptyrun", {"d1": _jsonl(tmp_path / "empty.jsonl", [])})[1]
    cmd = train_command(config, launcher=[str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
                                          "--master_port", str(free_port())])
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2, said[-3000:]
    assert "grape-ds: data error: unit 'd1' (domain) has 0 tokens" in said
    assert "Traceback" not in said
    assert not (census.runs / "fresh" / "config.yaml").exists()
