"""A finished run read back from its directory, and exported as a Hugging Face GPT-2 folder.

:func:`load_trained_run` rebuilds what a run trained: its resolved ``config.yaml`` (with the run's own
``ds_config.json``, so the run directory is self-contained), the packed data (``prepare_data`` with
the same cache: reused, or rebuilt when the cache is gone) and the GPT-2 module with the fp32 weights
of a complete checkpoint. ZeRO keeps the fp32 master weights partitioned over the ranks' optimizer
files; ``deepspeed.utils.zero_to_fp32`` merges them offline, in one process without a process group,
which is why this module imports deepspeed (and engine.py is not needed).

:func:`export_hf` writes ``GPT2LMHeadModel.save_pretrained`` with those weights and the run's
tokenizer, with its end-of-text token as EOS and BOS, so that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load the folder, and lm-evaluation-harness's ``hf`` model can run on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from grape_ds.checkpoint import complete_checkpoints
from grape_ds.config import Config, load_config
from grape_ds.data import PackedData, prepare_data
from grape_ds.model import build_model
from grape_ds.rundir import RunDirError, saved_world_size

__all__ = ["RunDirError", "TrainedRun", "load_run_config", "select_checkpoint", "fp32_state_dict",
           "load_trained_run", "export_hf", "EXPORT_INFO"]

log = logging.getLogger(__name__)

EXPORT_INFO = "grape_ds_export.json"  # in an export folder: which run and checkpoint it came from


@dataclass
class TrainedRun:
    """A run's config, packed data and the GPT-2 module with one checkpoint's fp32 weights."""
    run_dir: Path
    cfg: Config
    data: PackedData
    model: torch.nn.Module  # GPT2LMHeadModel, fp32, on the CPU, in eval mode
    step: int
    tag: str                # the checkpoint folder's name


def load_run_config(run_dir: Path) -> Config:
    """The run's resolved ``config.yaml``, validated against the run's own ``ds_config.json``.

    The DeepSpeed JSON the config names may have moved; the copy in the run directory holds the batch
    keys the run used, and the world size follows from them.
    """
    run_dir = Path(run_dir)
    config, ds_json = run_dir / "config.yaml", run_dir / "ds_config.json"
    for path in (config, ds_json):
        if not path.is_file():
            raise RunDirError(f"{run_dir} is not a grape-ds run directory: {path.name} is missing "
                              "(every run writes config.yaml and ds_config.json when it starts)")
    return load_config(config, [f"deepspeed.config={ds_json.resolve()}"], world_size=saved_world_size(run_dir))


def select_checkpoint(run_dir: Path, step: int | None = None) -> tuple[int, str]:
    """``(step, tag)`` of the newest complete checkpoint, or of the one at ``step``."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    done = complete_checkpoints(ckpt_dir)
    if not done:
        raise RunDirError(f"{run_dir} has no complete checkpoint under {ckpt_dir} (one counts once its "
                          "COMPLETE marker is written, after every rank saved it); train the run first")
    if step is None:
        return done[-1]
    for found in done:
        if found[0] == step:
            return found
    raise RunDirError(f"{run_dir} has no complete checkpoint at step {step}; complete ones are at steps "
                      f"{[s for s, _ in done]}")


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the ZeRO checkpoint ``ckpt_dir/tag``, merged from every rank's
    partition. DeepSpeed's progress lines go to stderr."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def _checkpoint_data_hash(ckpt_path: Path) -> str | None:
    """The packed-data hash the run's sampler recorded in the checkpoint."""
    state = torch.load(ckpt_path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False,
                       mmap=True)
    return state.get("sampler", {}).get("data_hash")


def load_trained_run(run_dir: Path, step: int | None = None) -> TrainedRun:
    """Config, packed data and the GPT-2 module with the fp32 weights of the newest complete
    checkpoint (or the one at ``step``)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    step, tag = select_checkpoint(run_dir, step)
    data = prepare_data(cfg.data)
    trained_on = _checkpoint_data_hash(run_dir / "checkpoints" / tag)
    if trained_on != data.content_hash:
        log.warning("the run trained on packed data %s, but its sources now pack to %s (a source, the "
                    "tokenizer or seq_len changed since): losses are measured on the current data",
                    trained_on, data.content_hash)
    model = build_model(cfg.model, data.vocab_size, data.eot_id, seed=cfg.train.seed)
    model.load_state_dict(fp32_state_dict(run_dir / "checkpoints", tag), strict=True)
    model.eval()
    return TrainedRun(run_dir, cfg, data, model, step, tag)


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
            "config": yaml.safe_load((run.run_dir / "config.yaml").read_text())}
    (out_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return run
