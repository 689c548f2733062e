"""``grape-ds prepare``: packing as its own step, ahead of training. A preparation killed half-way
through a multi-shard domain and started again ends byte-identical to an uninterrupted one, without
tokenising the finished shards again; training ranks wait for a preparation under way (no fixed
timeout) and then train on its folder without packing anything; bad records keep their named errors
in tokenising processes too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.runs import REPO, launch
from grape_ds.config import DataConfig, SourceConfig, TokenizerConfig, UnitConfig
from grape_ds.data import packing, prepare_data

pytestmark = pytest.mark.slow

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def _docs(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) for _ in range(n)]


def _jsonl(path: Path, rows: list) -> Path:
    """One line per row: a dict as JSON, a str as it is, bytes written raw."""
    path.write_bytes(b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
                              + b"\n" for r in rows))
    return path


def _experiment(root: Path, cache: Path) -> Path:
    """A config whose domain 'big' spans 12 shards of 64 documents."""
    big, small, task = (_jsonl(root / f"{n}.jsonl", [{"text": d} for d in _docs(s, k)])
                        for n, s, k in (("big", 0, 12 * 64), ("small", 1, 100), ("task", 2, 80)))
    cfg = yaml.safe_load((REPO / "yaml_configs" / "demo.yaml").read_text())
    cfg["data"] = {"cache_dir": str(cache), "seq_len": 32, "tokenizer": {"vocab_size": 300},
                   "domains": [{"name": "big", "source": {"type": "jsonl", "path": str(big)}},
                               {"name": "small", "source": {"type": "jsonl", "path": str(small)}}],
                   "tasks": [{"name": "task", "source": {"type": "jsonl", "path": str(task)}}]}
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _prepare(config: Path, cache: Path, *extra: str, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "grape_ds", "prepare", str(config), "--set", f"data.cache_dir={cache}",
           "--num-proc", "2", "--shard-docs", "64", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def _crash(proc: subprocess.Popen) -> None:
    """SIGKILL the preparing process and its tokenising processes, as a crash or the OOM killer would.
    multiprocessing's resource tracker is left to outlive them, as it does then: it removes the
    semaphores the dead processes held (killing it too would leave them in /dev/shm)."""
    import psutil
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    tracker = [p for p in tree if "resource_tracker" in " ".join(p.cmdline())]
    for p in tree:
        if p not in tracker:
            p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(tracker, timeout=30)


def _journal(cache: Path) -> list[dict]:
    found = list((cache / "packed").glob(f".*.prepare/{packing.SHARD_JOURNAL}"))
    return [json.loads(line) for line in found[0].read_text().splitlines()] if found else []


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _packed(cache: Path) -> Path:
    (root,) = [p for p in (cache / "packed").iterdir() if not p.name.startswith(".")]
    return root


def test_a_killed_preparation_resumes_to_the_uninterrupted_result_without_tokenising_finished_shards(tmp_path):
    semaphores = set(Path("/dev/shm").glob("sem.mp-*"))
    config = _experiment(tmp_path, tmp_path / "unused")
    whole = _prepare(config, tmp_path / "whole", "--num-proc", "1")  # the cut one below uses 2
    assert whole.returncode == 0, whole.stdout + whole.stderr
    assert "holds 3 units" in whole.stdout

    proc = _prepare(config, tmp_path / "cut", env={packing.SHARD_DELAY_ENV: "0.3"}, wait=False)
    deadline = time.time() + 120
    while sum(e["unit"] == "big" for e in _journal(tmp_path / "cut")) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    _crash(proc)
    before = _journal(tmp_path / "cut")
    kept = sum(e["unit"] == "big" for e in before)
    assert 3 <= kept < 12 and not list((tmp_path / "cut" / "packed").glob("[!.]*"))  # nothing complete yet

    again = _prepare(config, tmp_path / "cut")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"unit big: {kept} shard(s)" in again.stderr and "kept, not tokenised again" in again.stderr
    after = _journal(tmp_path / "cut")
    shards = [(e["unit"], e["shard"]) for e in after]
    assert len(shards) == len(set(shards))  # no shard was tokenised twice
    assert sorted(s for u, s in shards if u == "big") == list(range(12))
    assert after[:len(before)] == before and {e["pid"] for e in after[len(before):]}.isdisjoint(
        {e["pid"] for e in before})
    # byte for byte, whatever the interruption or the number of tokenising processes
    assert _tree(_packed(tmp_path / "cut")) == _tree(_packed(tmp_path / "whole"))
    assert not list((tmp_path / "cut" / "packed").glob(".*.partial"))
    assert set(Path("/dev/shm").glob("sem.mp-*")) <= semaphores  # the crash left none behind

    # prepared: the same command returns at once
    done = _prepare(config, tmp_path / "cut", "--num-proc", "1")
    assert done.returncode == 0 and "reusing packed data" in done.stderr and "(0.0 s)" in done.stdout


def test_training_ranks_wait_for_a_preparation_under_way_then_train_on_it(tmp_path):
    """The demo's data prepared slowly (0.2 s a shard) by `grape-ds prepare`: both training ranks find
    its lock held and wait for it (local rank 0 would otherwise pack), then train on its folder."""
    cache = tmp_path / "cache"
    prep = subprocess.Popen([sys.executable, "-m", "grape_ds", "prepare", "yaml_configs/demo.yaml",
                             "--set", f"data.cache_dir={cache}", "--num-proc", "1", "--shard-docs", "256"],
                            cwd=REPO, env={**os.environ, packing.SHARD_DELAY_ENV: "0.2"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not _journal(cache):  # it holds the lock and has written a shard
        assert prep.poll() is None and time.time() < deadline, prep.communicate()[0][-3000:]
        time.sleep(0.05)
    run = launch(tmp_path, cache, ["train.max_steps=4", "train.warmup_steps=1", "eval.every=0", "checkpoint.every=0",
                                   "logging.run_name=waited"])
    out = prep.communicate(timeout=300)[0]
    assert prep.returncode == 0, out[-3000:]
    said = run.stdout
    assert f"waiting for {cache / 'packed'}" in said, said[-3000:]
    assert "packing " not in said  # the ranks packed nothing themselves
    ranks = {p["pid"] for p in json.loads((tmp_path / "waited" / "ranks.json").read_text())}
    assert ranks.isdisjoint({e["pid"] for e in _journal(cache)})
    assert json.loads((tmp_path / "waited" / "status.json").read_text())["state"] == "finished"


@pytest.mark.parametrize("rows, num_proc, said", [
    # records are read and checked in the preparing process, with tokenising processes running
    (['{"text": "fine"}', '{"text": "bad \\ud800 text"}'], 2, ["domain 'd'", "d.jsonl:2", "not valid Unicode"]),
    (['{"text": "fine"}', "{oops"], 2, ["domain 'd'", "d.jsonl:2: not valid JSON"]),
    ([b'{"text": "caf\xe9"}'], 2, ["domain 'd'", "d.jsonl: not UTF-8"]),
    (['{"text": [1, 2, 3]}'] * 3 + ['{"text": [4, 5, "6"]}'], 1,
     ["domain 'd'", "d.jsonl:4", "item 2 is '6' (str), not an integer"]),
])
def test_bad_records_are_named_during_preparation(tmp_path, rows, num_proc, said):
    good = _jsonl(tmp_path / "good.jsonl", [{"text": d} for d in _docs(3, 40)])
    path = _jsonl(tmp_path / "d.jsonl", rows)
    tok = {"name": str(_gpt2ish(tmp_path))} if "[1, 2, 3]" in str(rows[0]) else {"vocab_size": 300}
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), seq_len=8, val_fraction=0.1,
                     tokenizer=TokenizerConfig(**tok),
                     domains=[UnitConfig(name="g", source=SourceConfig(type="jsonl", path=str(good))),
                              UnitConfig(name="d", source=SourceConfig(type="jsonl", path=str(path)))])
    with pytest.raises(ValueError) as caught:
        prepare_data(cfg, num_proc=num_proc, in_place_max_bytes=None, shard_docs=2)
    assert all(s in str(caught.value) for s in said), str(caught.value)
    assert not list((tmp_path / "cache" / "packed").glob("*"))  # bad data: nothing left to reuse


def _gpt2ish(tmp_path: Path) -> Path:
    from common.real_schema import write_gpt2_shaped_tokenizer
    return write_gpt2_shaped_tokenizer(tmp_path / "gpt2ish")
