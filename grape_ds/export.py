"""A finished run exported as a Hugging Face GPT-2 folder.

:func:`export_hf` reads the run back (:func:`grape_ds.rundir.load_trained_run`: its config, packed
data and the fp32 weights of a complete checkpoint) and writes ``GPT2LMHeadModel.save_pretrained``
with those weights and the run's tokenizer, with its end-of-text token as EOS and BOS, so that
``AutoModelForCausalLM`` and ``AutoTokenizer`` load the folder, and lm-evaluation-harness's ``hf``
model can run on it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from grape_ds.data import PackedData
from grape_ds.rundir import RunDirError, TrainedRun, load_trained_run

__all__ = ["export_hf", "EXPORT_INFO"]

log = logging.getLogger(__name__)

EXPORT_INFO = "grape_ds_export.json"  # in an export folder: which run and checkpoint it came from


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise RunDirError(f"{out_dir} is not empty; choose a new folder, or pass --force to write into it "
                          "(files of the same name are replaced)")


def _save_tokenizer(data: PackedData, out_dir: Path, max_length: int) -> None:
    """The run's tokenizer with its end-of-text token as EOS and BOS.

    The class is written as ``PreTrainedTokenizerFast`` (transformers 4 knows that name; 5 maps it to
    its ``TokenizersBackend``), so either version's ``AutoTokenizer`` loads the folder.
    """
    tokenizer = data.load_tokenizer()
    eot = tokenizer.convert_ids_to_tokens(data.eot_id)
    tokenizer.eos_token, tokenizer.bos_token = eot, eot
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def export_hf(run_dir: Path, out_dir: Path, step: int | None = None, force: bool = False) -> TrainedRun:
    """Write the model and tokenizer of a run's newest complete checkpoint (or the one at ``step``) as
    a Hugging Face folder; returns the run as loaded.

    Refuses a non-empty ``out_dir`` unless ``force`` (checked before anything is loaded).
    ``grape_ds_export.json`` records the run directory, the checkpoint and the packed data it came from.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    run = load_trained_run(run_dir, step)
    out_dir.mkdir(parents=True, exist_ok=True)
    run.model.save_pretrained(str(out_dir))
    _save_tokenizer(run.data, out_dir, run.model.config.n_positions)
    info = {"run_dir": str(run.run_dir.resolve()), "step": run.step, "checkpoint": run.tag,
            "data_hash": run.data.content_hash, "eot_id": run.data.eot_id,
            "n_positions": run.model.config.n_positions,
            "config": yaml.safe_load(run.paths.config.read_text())}
    (out_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return run
