"""Safe runs: one live run per run directory, a resume that checks what changed before it touches
anything, and bad inputs named before a launch (the bad-input census).

The census calls ``grape-ds check-config`` (and the hostfile launcher's dry run) in this process, one
bad input each, and asserts exit status 2, one message naming the file/line or key, no traceback,
and that no file of an existing run changed. Runs with real ranks are in tests/test_safe_runs_launch.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.runs import DEMO, REPO, TINY
from common.real_schema import BENCHMARK_RECORDS, write_benchmark, write_gpt2_shaped_tokenizer
from grape_ds.config import config_to_dict, load_config
from grape_ds.lockfile import live_holder
from grape_ds.rundir import RunDirBusy, RunLock, resume_changes

# ----------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------

_HOLD = ("import sys, time; from grape_ds.rundir import RunLock; RunLock.acquire(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(600)")


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds ``run_dir``'s lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_lock_is_refused_by_name_and_a_dead_ones_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        with pytest.raises(RunDirBusy) as err:
            RunLock.acquire(run)
        message = str(err.value)
        assert f"process id {holder.pid}" in message and f"host {socket.gethostname()}" in message
        assert "since 20" in message and "kill -TERM" in message
        assert live_holder(run)["pid"] == holder.pid
    finally:
        holder.kill()  # SIGKILL: no chance to release
        holder.wait()
    assert live_holder(run) is None  # the kernel dropped the dead process's lock
    with caplog.at_level(logging.WARNING, logger="grape_ds.rundir"):
        lock = RunLock.acquire(run)
    assert f"process id {holder.pid}" in caplog.text and "ended without releasing" in caplog.text
    assert json.loads((run / "run.lock").read_text())["pid"] != holder.pid
    lock.release()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grape_ds.rundir"):
        RunLock.acquire(run).release()
    assert "ended without releasing" not in caplog.text  # a released lock is not a stale one


def _saved_run(root: Path, sets: list[str], world_size: int = 2) -> Path:
    """A run directory as a run leaves it: its config, DeepSpeed JSON, a complete checkpoint."""
    cfg = load_config(DEMO, [*sets, f"logging.output_dir={root}"], world_size=world_size)
    run = cfg.run_dir
    (run / "checkpoints" / "step00000010").mkdir(parents=True)
    (run / "checkpoints" / "step00000010" / "COMPLETE").write_text(json.dumps({"step": 10, "world_size": world_size}))
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    (run / "ds_config.json").write_text(json.dumps(cfg.ds_config, indent=2) + "\n")
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 5.0}\n')
    return run


def test_a_build_lock_nobody_holds_is_stale_and_one_being_built_is_not(tmp_path):
    from grape_ds.preflight import stale_build_locks
    lock = tmp_path / "fused_adam" / "lock"
    lock.parent.mkdir()
    lock.write_text("")
    assert stale_build_locks(tmp_path) == [lock]
    building = subprocess.Popen([sys.executable, "-c", "import time; print('in', flush=True); time.sleep(60)"],
                                cwd=lock.parent, stdout=subprocess.PIPE, text=True)
    try:
        assert building.stdout.readline().strip() == "in"
        assert stale_build_locks(tmp_path) == []  # a compiler at work in the folder: a live build
    finally:
        building.kill()
        building.wait()


def test_resume_changes_name_every_key_and_the_world_size(tmp_path):
    run = _saved_run(tmp_path, TINY)
    new = load_config(DEMO, [*TINY, f"logging.output_dir={tmp_path}", "model.n_layer=3", "mixture.mu_task=1",
                             "train.max_steps=80", "logging.every=7"], world_size=1)
    allowed, refused = resume_changes(run, config_to_dict(new), 1, new.ds_config["train_batch_size"])
    assert refused[:2] == ["mixture.mu_task: 5.0 -> 1.0", "model.n_layer: 2 -> 3"]
    assert refused[2].startswith("world size: 2 ranks -> 1 ranks, which changes the global batch from 16 to 8")
    assert refused[2].endswith("keep it at 16; on 1 ranks with train.micro_batch_size=4, set "
                               "train.gradient_accumulation_steps=4")
    assert allowed == ["logging.every: 5 -> 7", "train.max_steps: 40 -> 80"]
    same = load_config(DEMO, [*TINY, f"logging.output_dir={tmp_path}"], world_size=2)
    assert resume_changes(run, config_to_dict(same), 2, 16) == ([], [])
    # on 1 rank with the global batch kept: allowed, and the checkpoint will be converted
    kept = load_config(DEMO, [*TINY, f"logging.output_dir={tmp_path}", "train.gradient_accumulation_steps=4"],
                       world_size=1)
    allowed, refused = resume_changes(run, config_to_dict(kept), 1, kept.ds_config["train_batch_size"], 2)
    assert refused == []
    assert allowed == ["train.gradient_accumulation_steps: 2 -> 4", "world size: 2 ranks -> 1 ranks (the "
                       "checkpoint is converted to DeepSpeed's universal format)"]


# ----------------------------------------------------------------------------------------------
# The census
# ----------------------------------------------------------------------------------------------

_WORDS = "alpha beta gamma delta river stone cloud paper orange window garden silver market".split()


def _docs(seed: int, n: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=30)) for _ in range(n)]


def _jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                    encoding="utf-8")
    return path


class Census:
    """The inputs of the census: an existing run (``runs/old``) and jsonl units to break one by one."""

    def __init__(self, root: Path) -> None:
        self.root, self.runs, self.cache = root, root / "runs", root / "cache"
        self.old = _saved_run(self.runs, self.base_sets)
        self.good = {f"d{k}": _jsonl(root / "good" / f"d{k}.jsonl", ({"text": t} for t in _docs(k)))
                     for k in range(3)}
        self.task = _jsonl(root / "good" / "t0.jsonl", ({"text": t} for t in _docs(9)))

    @property
    def base_sets(self) -> list[str]:
        return [*TINY, "logging.run_name=old"]

    def demo(self, *sets: str, extra: tuple[str, ...] = ()) -> list[str]:
        argv = ["check-config", str(DEMO), "--world-size", "2", *extra]
        for s in [*self.base_sets, f"logging.output_dir={self.runs}", *sets]:
            argv += ["--set", s]
        return argv

    def units(self, name: str, domains: dict | None = None, tasks: dict | None = None,
              tokenizer: dict | None = None, benchmark: Path | None = None) -> list[str]:
        """``check-config --data`` of a config with jsonl units (``domains`` replaces some of the good
        ones), written as ``<name>.yaml``; its run directory ``runs/fresh`` must never appear."""
        paths = {**self.good, **(domains or {})}
        task_units = [{"name": "t0", "source": {"type": "jsonl", "path": str(self.task)}}]
        if benchmark is not None:
            task_units.append({"name": "medqa", "source": {"type": "benchmark", "benchmark": "medqa",
                                                          "path": str(benchmark)}})
        cfg = {
            "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32},
            "data": {"cache_dir": str(self.cache), "seq_len": 32, "tokenizer": tokenizer or {"vocab_size": 300},
                     "domains": [{"name": n, "source": {"type": "jsonl", "path": str(p)}} for n, p in paths.items()],
                     "tasks": task_units},
            "mixture": {"method": "grape", "every": 10},
            "train": {"max_steps": 20, "warmup_steps": 2, "micro_batch_size": 2},
            "deepspeed": {"config": str(REPO / "ds_configs" / "zero2_fp32.json")},
            "logging": {"output_dir": str(self.runs), "run_name": "fresh"},
        }
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return ["check-config", str(path), "--world-size", "2", "--data"]


@pytest.fixture(scope="module")
def census(tmp_path_factory) -> Census:
    return Census(tmp_path_factory.mktemp("census"))


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_eos_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(folder))
    return folder


def _ds_json(c: Census, name: str, content: str) -> str:
    path = c.root / f"{name}.json"
    path.write_text(content)
    return f"deepspeed.config={path}"


def _medqa_missing_field(c: Census) -> Path:
    records = {split: [dict(r) for r in rows] for split, rows in BENCHMARK_RECORDS["medqa"].items()}
    del records["train"][2]["ending2"]
    return write_benchmark("medqa", c.root / "medqa", records)


def _medqa_surrogate(c: Census) -> Path:
    records = {split: [dict(r) for r in rows] for split, rows in BENCHMARK_RECORDS["medqa"].items()}
    records["train"][1]["sent1"] = "Patient \ud800 has a cough."
    return write_benchmark("medqa", c.root / "medqa_sur", records)


def _hostfile(c: Census, text: str) -> list[str]:
    path = c.root / "hostfile"
    path.write_text(text)
    return ["launch", "hostfile", "--hostfile", str(path), "--config", str(DEMO), "--dry-run"]


# id -> (argv from the census, substrings the one message must hold)
CASES = {
    # config keys and values
    "unknown key": (lambda c: c.demo("mixture.wieghts=[1]"), ["mixture.wieghts", "did you mean 'weights'"]),
    "weights not numbers": (lambda c: c.demo("mixture.weights=[a,1,1,1,1,1]"),
                            ["mixture.weights[0]: expected a number, got 'a'"]),
    "weights a word": (lambda c: c.demo("mixture.weights=uniform"), ["mixture.weights: expected a list"]),
    "weights miscounted": (lambda c: c.demo("mixture.weights=[1,1,1]"), ["mixture.weights: 3 weights for 6"]),
    "max_windows a word": (lambda c: c.demo("eval.max_windows=abc"), ["eval.max_windows", "'abc'"]),
    "max_windows zero": (lambda c: c.demo("eval.max_windows=0"), ["eval.max_windows: must be > 0"]),
    "unit_clip a word": (lambda c: c.demo("mixture.unit_clip=abc"), ["mixture.unit_clip", "'abc'"]),
    "mu_domain infinite": (lambda c: c.demo("mixture.mu_domain=.inf"), ["mixture.mu_domain: must be a finite"]),
    "lr not a number": (lambda c: c.demo("train.lr=.nan"), ["train.lr: must be a finite"]),
    "run_name ..": (lambda c: c.demo("logging.run_name=.."), ["logging.run_name: '..' is not a folder name"]),
    "heads do not divide": (lambda c: c.demo("model.n_head=3"), ["model.n_head: 3 does not divide"]),
    "config file missing": (lambda c: ["check-config", str(c.root / "nope.yaml")], ["config file not found", "nope.yaml"]),
    "config not YAML": (lambda c: ["check-config", str(_jsonl(c.root / "bad.yaml", ["model: [1, 2"]))],
                        ["bad.yaml: not valid YAML", "line 2"]),
    # DeepSpeed JSON
    "ds json invalid": (lambda c: c.demo(_ds_json(c, "broken", '{"zero_optimization": {')),
                        ["deepspeed.config", "broken.json is not valid JSON"]),
    "ds json batch": (lambda c: c.demo(_ds_json(c, "batch", '{"train_batch_size": 7}')),
                      ["batch.json has train_batch_size=7", "gives train_batch_size=16"]),
    "ds json optimizer": (lambda c: c.demo(_ds_json(c, "optim", '{"optimizer": {"type": "Adam"}}')),
                          ["optim.json has an 'optimizer' section"]),
    # data files (check-config --data reads every record)
    "source path missing": (lambda c: c.units("missing", {"d1": c.root / "nowhere.jsonl"}),
                            ["data.domains[1].source.path: path does not exist", "nowhere.jsonl"]),
    "record not JSON": (lambda c: c.units("notjson", {"d1": _jsonl(c.root / "nj.jsonl", [{"text": "a b"}, "{oops"])}),
                        ["domain 'd1'", "nj.jsonl:2: not valid JSON"]),
    "unpaired surrogate": (lambda c: c.units("surrogate", {"d1": _jsonl(
        c.root / "sur.jsonl", [{"text": "fine"}, {"text": "fine"}, '{"text": "bad \\ud800 text"}'])}),
        ["domain 'd1'", "sur.jsonl:3", "not valid Unicode"]),
    "record without field": (lambda c: c.units("nofield", {"d2": _jsonl(c.root / "nf.jsonl", [{"text": "a"}, {"body": "b"}])}),
                             ["domain 'd2'", "nf.jsonl:2", "no field 'text'", "['body']"]),
    "file not UTF-8": (lambda c: c.units("latin1", {"d0": _bytes(c.root / "latin.jsonl", b'{"text": "caf\xe9"}\n')}),
                       ["domain 'd0'", "latin.jsonl: not UTF-8"]),
    "empty domain": (lambda c: c.units("empty", {"d1": _jsonl(c.root / "empty.jsonl", [])}),
                     ["unit 'd1' (domain) has 0 tokens", "fewer than 2 windows"]),
    "domain of 3 tokens": (lambda c: c.units("tiny", {"d2": _jsonl(c.root / "tiny.jsonl", [{"text": "ab"}])}),
                           ["unit 'd2' (domain) has 3 tokens"]),
    "token ids above vocabulary": (lambda c: c.units(
        "ids", {"d1": _jsonl(c.root / "ids.jsonl", [{"text": [1, 2, 60000]}] * 50)},
        tokenizer={"name": str(write_gpt2_shaped_tokenizer(c.root / "gpt2ish"))}),
        ["unit 'd1'", "token ids in [1, 60000]", "vocabulary [0, 50257)"]),
    "benchmark row without field": (lambda c: c.units("medqa", benchmark=_medqa_missing_field(c)),
                                    ["benchmark medqa, split 'train', row 2", "no field 'ending2'"]),
    "benchmark text not Unicode": (lambda c: c.units("medqa_sur", benchmark=_medqa_surrogate(c)),
                                   ["unit 'medqa', a document starting 'Patient", "not valid Unicode"]),
    # tokenizer
    "tokenizer without eos": (lambda c: c.units("noeos", tokenizer={"name": str(_no_eos_tokenizer(c.root / "noeos"))}),
                              ["data.tokenizer.name", "has no eos token"]),
    "tokenizer folder missing": (lambda c: c.units("notok", tokenizer={"name": str(c.root / "no_such_tokenizer")}),
                                 ["data.tokenizer.name", "no_such_tokenizer"]),
    # hostfile
    "hostfile slots": (lambda c: _hostfile(c, "localhost slots=2\nnode2 slots=two\n"), ["hostfile:2", "slots=<n>"]),
    "hostfile twice": (lambda c: _hostfile(c, "localhost slots=2\nlocalhost slots=2\n"), ["hostfile:2", "listed twice"]),
    # run directory
    "output folder is a file": (lambda c: c.demo(f"logging.output_dir={_bytes(c.root / 'afile', b'x')}"),
                                ["afile is a file, not a folder"]),
    "run directory in use": (lambda c: c.demo(extra=("--x-hold",)), ["runs/old is in use by a live run", "process id"]),
    "resume with another model": (lambda c: c.demo("model.n_layer=3"),
                                  ["cannot resume", "model.n_layer: 2 -> 3", "--no-resume", "logging.run_name"]),
    "stale extension build lock": (lambda c: c.demo(extra=("--x-lock",)),
                                   ["the lock of a JIT extension build that no process is running", "rm "]),
    "resume on another world size": (lambda c: [*c.demo(), "--world-size", "1"],
                                     ["cannot resume", "world size: 2 ranks -> 1 ranks", "keep it at 16",
                                      "train.gradient_accumulation_steps=4"]),
}


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_census_has_at_least_25_inputs():
    assert len(CASES) >= 25 and len(CASES) == 35


def test_the_census_inputs_are_right_but_for_their_fault(census, capsys):
    """The good jsonl units pack: each data case fails for the fault planted in it alone."""
    from grape_ds.cli import main
    assert main(census.units("good")) == 0, capsys.readouterr().err
    assert main(census.demo()) == 0, capsys.readouterr().err  # and the existing run resumes as it is


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_before_launch(case, census, capsys, monkeypatch):
    from grape_ds.cli import main as cli_main
    from grape_ds.launch import main as launch_main
    make, expected = CASES[case]
    argv = make(census)
    holder = None
    if "--x-hold" in argv:
        argv.remove("--x-hold")
        holder = hold_lock(census.old)
    if "--x-lock" in argv:  # a build of an op killed mid-way, in the extensions folder
        argv.remove("--x-lock")
        extensions = census.root / "torch_extensions"
        (extensions / "cpu_adam").mkdir(parents=True, exist_ok=True)
        (extensions / "cpu_adam" / "lock").write_text("")
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    before = _snapshot(census.old)
    try:
        rc = launch_main(argv[1:]) if argv[0] == "launch" else cli_main(argv)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    message = " ".join(err.split())  # one message, whatever the line wrapping
    for text in expected:
        assert text in message, (text, err)
    assert "Traceback" not in out + err
    assert _snapshot(census.old) == before
    assert not (census.runs / "fresh").exists()
