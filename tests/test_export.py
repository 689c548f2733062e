"""``grape-ds eval`` and ``grape-ds export`` on one tiny demo run (2 ranks through the deepspeed
launcher): the offline evaluation reproduces the in-training one, and the exported Hugging Face folder
loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and computes what the checkpoint's weights do."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.runs import REPO, launch
from grape_ds.export import export_hf
from grape_ds.rundir import RunDirError, load_trained_run

pytestmark = pytest.mark.slow

STEPS = 6


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grape_ds", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache) -> Path:
    root = tmp_path_factory.mktemp("export_runs")
    launch(root, data_cache, [f"train.max_steps={STEPS}", "checkpoint.every=0", "eval.every=0",
                              "mixture.method=static", "logging.run_name=exp"])
    return root / "exp"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    proc = _cli("export", run_dir, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_eval_cli_reproduces_the_final_training_eval(run_dir):
    proc = _cli("eval", run_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "multiple-choice accuracy: skipped" in proc.stdout
    (row,) = _rows(run_dir / "eval" / "eval_cli.jsonl")
    trained = _rows(run_dir / "eval" / "eval.jsonl")[-1]
    assert row["step"] == trained["step"] == STEPS and row["checkpoint"] == f"step{STEPS:08d}"
    assert row["max_windows"] == 32  # the run's eval.max_windows, as in training
    for kind in ("domain_loss", "task_loss"):
        assert row[kind].keys() == trained[kind].keys()
        for unit, loss in row[kind].items():
            assert math.isfinite(loss)
            assert loss == pytest.approx(trained[kind][unit], abs=1e-5), (kind, unit)
    assert "mc_acc" not in row


def test_eval_and_export_name_what_a_run_directory_lacks(run_dir, tmp_path):
    proc = _cli("eval", run_dir, "--step", 3)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"has no complete checkpoint at step 3; complete ones are at steps [{STEPS}]" in proc.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.yaml", "ds_config.json"):
        shutil.copy(run_dir / name, bare / name)
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        load_trained_run(bare)
    with pytest.raises(RunDirError, match="config.yaml is missing"):
        export_hf(tmp_path / "nothing", tmp_path / "out")


def test_export_loads_and_computes_what_the_checkpoint_does(run_dir, exported):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    run = load_trained_run(run_dir)
    x = torch.from_numpy(run.data.windows("domain_0", "val")[:2].astype("int64"))  # [2, seq_len]
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, run.model(input_ids=x).logits, atol=1e-5, rtol=0)
    assert hf.config.eos_token_id == hf.config.bos_token_id == run.data.eot_id
    info = json.loads((exported / "grape_ds_export.json").read_text())
    assert (info["step"], info["data_hash"]) == (STEPS, run.data.content_hash)


def test_exported_tokenizer_encodes_as_the_run_does(run_dir, exported):
    from transformers import AutoTokenizer

    from grape_ds.data import prepare_data
    from grape_ds.rundir import load_run_config

    data = prepare_data(load_run_config(run_dir).data)
    ours, theirs = data.load_tokenizer(), AutoTokenizer.from_pretrained(str(exported))
    sample = ours.decode(data.windows("task_2", "val")[0][:60].tolist()) + " Hello, world!\n 123"
    assert theirs.encode(sample) == ours.encode(sample)
    assert theirs.eos_token_id == theirs.bos_token_id == data.eot_id


def test_export_refuses_a_non_empty_folder_unless_forced(run_dir, exported):
    with pytest.raises(RunDirError, match="is not empty"):
        export_hf(run_dir, exported)
    assert export_hf(run_dir, exported, force=True).step == STEPS
