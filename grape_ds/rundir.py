"""The run directory: every path of a run named once, its atomic writes, one live run at a time, what a
resume may change, and a finished run read back.

**Paths.** :class:`RunPaths` names each file and folder of ``<logging.output_dir>/<logging.run_name>``
(config, DeepSpeed JSON, ranks, mixture, status, metrics, evaluation, batch trace, checkpoints,
TensorBoard, launch files); nothing else in grape-ds spells them. Files that a reader may open at any
moment (``mixture.json``, ``status.json``) are written with :func:`atomic_write_text` (a temporary
file renamed over the old one), so a reader sees the old content or the new, never half of it.

**The lock.** Rank 0 of a run holds an exclusive lock on ``<run>/run.lock`` for as long as the run
lives (:mod:`grape_ds.lockfile`; the file says who holds it: host, process id, since when, the
command). A second launch into the same directory (another terminal, a requeued job overlapping the old
one, another master port) is refused at once with that holder named, before it reads or writes
anything else of the run. A lock left by a dead run is free: the next launch takes it over and says
whose it was.

**Resuming after a change.** Before any state is loaded or any file of the run is written,
:func:`resume_changes` compares the config a relaunch resolves with the run's saved ``config.yaml``
(and its ``ds_config.json``, which fixes the world size the checkpoints were written on). Keys that only
change how the run is watched or how long it goes on (:data:`RESUMABLE`) may change, and so may the
number of ranks when the global batch stays the same (the checkpoint is then converted to DeepSpeed's
universal format); any other change is refused with every changed key, its old and new value, and
what the user can do.

**A finished run.** :func:`load_trained_run` rebuilds what a run trained, for ``grape-ds eval`` and
``grape-ds export``: its resolved ``config.yaml`` (with the run's own ``ds_config.json``, so the
directory is self-contained), the packed data (``prepare_data`` with the same cache: reused, or rebuilt
when the cache is gone) and the GPT-2 module with the fp32 weights of a complete checkpoint
(:func:`grape_ds.checkpoint.consolidated_state_dict`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from grape_ds.checkpoint import complete_checkpoints, consolidated_state_dict, saved_client_state
from grape_ds.config import Config, load_config
from grape_ds.lockfile import LOCK_FILE, LockBusy, LockFile, holder_text

__all__ = ["RunPaths", "atomic_write_text", "atomic_write_json", "append_jsonl", "truncate_jsonl", "read_jsonl",
           "RunDirError", "RunDirBusy", "RunLock", "LOCK_FILE", "RESUMABLE", "BATCH_KEYS", "resume_changes",
           "saved_world_size", "saved_global_batch", "flatten", "check_writable", "refused_message",
           "load_run_config", "select_checkpoint", "TrainedRun", "load_trained_run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPaths:
    """Every path of the run directory ``root``, named once."""
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")            # the resolved experiment
    ds_config = property(lambda self: self.root / "ds_config.json")      # the DeepSpeed JSON, batch keys resolved
    ranks = property(lambda self: self.root / "ranks.json")              # host, address, pid of each rank
    mixture = property(lambda self: self.root / "mixture.json")          # the controller's summary
    status = property(lambda self: self.root / "status.json")            # finished or stopped, and why
    metrics = property(lambda self: self.root / "metrics.jsonl")         # a row per optimizer step
    eval = property(lambda self: self.root / "eval" / "eval.jsonl")      # evaluations during training
    eval_cli = property(lambda self: self.root / "eval" / "eval_cli.jsonl")  # `grape-ds eval` results
    checkpoints = property(lambda self: self.root / "checkpoints")       # grape_ds.checkpoint's folders
    tensorboard = property(lambda self: self.root / "tensorboard")       # event files
    launch = property(lambda self: self.root / "launch")                 # hostfile, .deepspeed_env of a launch
    slurm = property(lambda self: self.root / "slurm")                   # SLURM job and rank logs
    lock = property(lambda self: self.root / LOCK_FILE)

    def trace(self, rank: int) -> Path:
        """The batch trace of global rank ``rank`` (``logging.trace_batches``)."""
        return self.root / "trace" / f"rank{rank}.jsonl"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj, indent: int | None = 2) -> None:
    """:func:`atomic_write_text` of ``obj`` as JSON (one trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def append_jsonl(path: Path, row: dict) -> None:
    """Append ``row`` as one JSON line (the folder is created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Every row of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the rows with ``step <= last_step`` (a resumed run rewrites what came after)."""
    path = Path(path)
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
        atomic_write_text(path, "".join(r + "\n" for r in rows))


# Keys a resumed run may change: how it is watched, evaluated and checkpointed, how long it runs,
# where its caches and outputs live, and the collective timeout. ``train.max_steps`` also moves the LR
# schedule's horizon (the steps already taken keep their learning rate).
RESUMABLE = ("train.max_steps", "eval.", "checkpoint.every", "checkpoint.keep_last", "checkpoint.resume",
             "logging.every", "logging.progress", "logging.output_dir", "logging.run_name",
             "logging.trace_batches", "deepspeed.timeout_minutes", "data.cache_dir", "deepspeed.config")


class RunDirError(ValueError):
    """A run directory cannot be used as asked; the message says why and what to do."""


class RunDirBusy(RunDirError):
    """Another live process holds the run directory's lock."""


def check_writable(run_dir: Path) -> None:
    """The run directory, or the nearest folder above it that exists, must be writable.

    Raises:
        RunDirError: it is not (read-only file system, permissions), or a file stands in its way.
    """
    path = Path(run_dir)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunDirError(f"run directory {run_dir}: {probe} is a file, not a folder; choose another "
                          "logging.output_dir / logging.run_name")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {run_dir}: {probe} is not writable (read-only file system or "
                          "permissions); set logging.output_dir to a folder you can write")


class RunLock(LockFile):
    """The exclusive lock on ``<run>/run.lock`` (rank 0 only; :class:`grape_ds.lockfile.LockFile`). Use
    :meth:`acquire`, then :meth:`release` when the run ends (a process that dies releases it too)."""

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Lock ``run_dir`` (created if needed) for this process.

        Raises:
            RunDirBusy: another live process holds it; the message names its host, process id and
                start time.
            RunDirError: the directory is not writable or the lock file cannot be created.
        """
        run_dir = Path(run_dir)
        check_writable(run_dir)
        try:
            return super().acquire(run_dir)
        except LockBusy as busy:
            info = busy.holder
            raise RunDirBusy(
                f"run directory {run_dir} is in use by a live run ({holder_text(info)}); "
                f"its command: {info.get('command', '?')}. Wait for it to end, stop it (kill -TERM "
                f"{info.get('pid', '<pid>')} on {info.get('host', 'its host')} saves a checkpoint first), "
                "or launch into another logging.run_name") from None
        except OSError as exc:
            raise RunDirError(f"run directory {run_dir}: cannot create {run_dir / LOCK_FILE} ({exc.strerror}); "
                              "set logging.output_dir to a folder you can write") from None


# ----------------------------------------------------------------------------------------------
# Resume compatibility
# ----------------------------------------------------------------------------------------------

def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def saved_world_size(run_dir: Path) -> int | None:
    """The number of ranks the run was launched on, from its ``ds_config.json`` (None: not there)."""
    try:
        ds = json.loads(RunPaths(run_dir).ds_config.read_text())
        return int(ds["train_batch_size"]) // (int(ds["train_micro_batch_size_per_gpu"])
                                               * int(ds["gradient_accumulation_steps"]))
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


# On another number of ranks a resume keeps the global batch: these may change with the world size
# as long as micro_batch_size x gradient_accumulation_steps x ranks stays what it was.
BATCH_KEYS = ("train.micro_batch_size", "train.gradient_accumulation_steps")


def saved_global_batch(run_dir: Path) -> int | None:
    """Sequences per optimizer step the run trained with (``train_batch_size`` of its ``ds_config.json``)."""
    try:
        return int(json.loads(RunPaths(run_dir).ds_config.read_text())["train_batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resume_changes(run_dir: Path, new: dict, world_size: int, global_batch: int | None = None,
                   checkpoint_world: int | None = None) -> tuple[list[str], list[str]]:
    """Compare a relaunch's resolved config (``config_to_dict``) and world size with the run's saved
    ones: ``(allowed, refused)`` changes, each ``"key: old -> new"``. Empty lists when nothing changed
    or the run has no saved config.

    ``checkpoint_world`` is the number of ranks the checkpoint to resume was written on (None: the
    run's ``ds_config.json`` says). Another world size is allowed when the global batch
    (``global_batch``, sequences per optimizer step) stays the run's; then ``train.micro_batch_size`` and ``train.gradient_accumulation_steps``
    may change too. Otherwise the refusal says which values keep it.

    Raises:
        RunDirError: the saved ``config.yaml`` cannot be read.
    """
    path = RunPaths(run_dir).config
    if not path.is_file():
        return [], []
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RunDirError(f"{path}: cannot read the run's saved config ({exc}); move the run directory "
                          "away or start over with --no-resume") from None
    before, after = flatten(old), flatten(new)
    old_batch = saved_global_batch(run_dir)
    batch_kept = global_batch is not None and old_batch == global_batch
    allowed, refused = [], []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, "<absent>"), after.get(key, "<absent>")
        if a == b:
            continue
        ok = _resumable(key) or (key in BATCH_KEYS and batch_kept)
        (allowed if ok else refused).append(f"{key}: {a!r} -> {b!r}")
    old_world = checkpoint_world if checkpoint_world is not None else saved_world_size(run_dir)
    if old_world is not None and old_world != world_size:
        change = f"world size: {old_world} ranks -> {world_size} ranks"
        if batch_kept:
            allowed.append(change + " (the checkpoint is converted to DeepSpeed's universal format)")
        else:
            micro = after.get("train.micro_batch_size")
            hint = ""
            if old_batch and isinstance(micro, int) and old_batch % (micro * world_size) == 0:
                hint = (f"; on {world_size} ranks with train.micro_batch_size={micro}, set "
                        f"train.gradient_accumulation_steps={old_batch // (micro * world_size)}")
            refused.append(f"{change}, which changes the global batch from {old_batch} to {global_batch} "
                           f"sequences per step (micro_batch_size x gradient_accumulation_steps x ranks); "
                           f"keep it at {old_batch}{hint}")
    return allowed, refused


def refused_message(run_dir: Path, refused: list[str]) -> str:
    """The error for a resume whose config changed in ways the checkpoint cannot follow."""
    lines = [f"cannot resume {run_dir}: the config differs from the one its checkpoints were written "
             "with, in keys a checkpoint cannot follow:"]
    lines += [f"  {c}" for c in refused]
    what = ("put those values back to resume this run, or start a new run: another logging.run_name (the "
            "old run stays as it is), or --no-resume (the old run is moved aside to <run>.replaced-<time>, "
            "never deleted).")
    return "\n".join(lines + ["What you can do: " + what])


# ----------------------------------------------------------------------------------------------
# A finished run, read back
# ----------------------------------------------------------------------------------------------

def load_run_config(run_dir: Path) -> Config:
    """The run's resolved ``config.yaml``, validated against the run's own ``ds_config.json``.

    The DeepSpeed JSON the config names may have moved; the copy in the run directory holds the batch
    keys the run used, and the world size follows from them.

    Raises:
        RunDirError: ``run_dir`` is not a run directory (``config.yaml`` or ``ds_config.json`` missing).
        ConfigError: the saved config no longer loads.
    """
    paths = RunPaths(run_dir)
    for path in (paths.config, paths.ds_config):
        if not path.is_file():
            raise RunDirError(f"{run_dir} is not a grape-ds run directory: {path.name} is missing "
                              "(every run writes config.yaml and ds_config.json when it starts)")
    return load_config(paths.config, [f"deepspeed.config={paths.ds_config.resolve()}"],
                       world_size=saved_world_size(run_dir))


def select_checkpoint(run_dir: Path, step: int | None = None) -> tuple[int, str]:
    """``(step, tag)`` of the newest complete checkpoint, or of the one at ``step``.

    Raises:
        RunDirError: the run has no complete checkpoint (at ``step``).
    """
    ckpt_dir = RunPaths(run_dir).checkpoints
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


@dataclass
class TrainedRun:
    """A run's config, packed data and the GPT-2 module with one checkpoint's fp32 weights."""
    paths: RunPaths
    cfg: Config
    data: object            # grape_ds.data.PackedData
    model: torch.nn.Module  # GPT2LMHeadModel, fp32, on the CPU, in eval mode
    step: int
    tag: str                # the checkpoint folder's name

    @property
    def run_dir(self) -> Path:
        return self.paths.root


def load_trained_run(run_dir: Path, step: int | None = None) -> TrainedRun:
    """Config, packed data and the GPT-2 module with the fp32 weights of the newest complete
    checkpoint (or the one at ``step``). A run trained on packed data other than its sources pack to
    now (a source, the tokenizer or ``seq_len`` changed) is loaded with a warning.

    Raises:
        RunDirError: not a run directory, or no complete checkpoint (at ``step``).
    """
    # the data package and the model (tokenizers, transformers: seconds of imports) load only when a
    # run is read back, not for the launchers and pre-flight checks that use the rest of this module
    from grape_ds.data import prepare_data
    from grape_ds.model import build_model

    paths = RunPaths(run_dir)
    cfg = load_run_config(paths.root)
    step, tag = select_checkpoint(paths.root, step)
    data = prepare_data(cfg.data)
    trained_on = saved_client_state(paths.checkpoints, tag).get("sampler", {}).get("data_hash")
    if trained_on != data.content_hash:
        log.warning("the run trained on packed data %s, but its sources now pack to %s (a source, the "
                    "tokenizer or seq_len changed since): losses are measured on the current data",
                    trained_on, data.content_hash)
    model = build_model(cfg.model, data.vocab_size, data.eot_id, seed=cfg.train.seed)
    model.load_state_dict(consolidated_state_dict(paths.checkpoints, tag), strict=True)
    model.eval()
    return TrainedRun(paths, cfg, data, model, step, tag)
