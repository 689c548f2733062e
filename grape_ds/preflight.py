"""Pre-flight: what can be known before a launch, checked before any process starts.

``grape-ds check-config`` runs :func:`preflight` after the config itself validates (keys, types,
ranges, the DeepSpeed JSON's batch arithmetic); the launchers run it before they start ranks.
Each check raises :class:`PreflightError` with one message that names the file, key or folder:

- the run directory can be created and written, and no live run holds it (``<run>/run.lock``);
- resuming: the config changes nothing the run's checkpoints cannot follow (world size included);
- a named tokenizer loads, is a fast tokenizer and has an end-of-text (eos) token (a hub name is
  checked only when it is in the local cache: pre-flight fetches nothing);
- no stale extension build lock: a PyTorch/DeepSpeed JIT build (``TORCH_EXTENSIONS_DIR``) that was
  killed leaves a ``lock`` file that makes the next build of that op wait in silence for ever; a lock
  with no live process building in its folder is reported with the command that clears it;
- with ``data=True``: every unit is packed (or its packed folder reused), which reads every record of
  every source, so bad records (invalid JSON or Unicode, missing fields), empty or too small units and
  token ids outside the vocabulary are found here, named by file, line and unit, and the ranks then
  reuse the packed folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grape_ds.config import Config, config_to_dict
from grape_ds.lockfile import live_holder
from grape_ds.rundir import RunDirError, RunPaths, check_writable, refused_message, resume_changes

__all__ = ["PreflightError", "preflight", "stale_build_locks", "ResumePlan", "resume_plan"]


class PreflightError(ValueError):
    """A launch would fail; the message names what and where."""


@dataclass(frozen=True)
class ResumePlan:
    """What a resume of a run directory will load: the newest complete checkpoint that is whole,
    the number of ranks that wrote it, and the config changes it accepts (``"key: old -> new"``)."""
    step: int
    tag: str
    world_size: int | None
    allowed: list[str]


def resume_plan(cfg: Config, world_size: int) -> ResumePlan | None:
    """The resume of ``cfg.run_dir`` on ``world_size`` ranks, or None when it has no complete
    checkpoint. The one check both the pre-flight and a launching rank 0 make.

    Raises:
        RunDirError: the config or world size changed in a way the checkpoint cannot follow (every
            change listed, :func:`grape_ds.rundir.refused_message`), or the saved config is unreadable.
    """
    from grape_ds.checkpoint import checkpoint_world_size, complete_checkpoints, verify_checkpoint
    ckpt_dir = RunPaths(cfg.run_dir).checkpoints
    done = complete_checkpoints(ckpt_dir)
    if not done:
        return None
    step, tag = next(((s, t) for s, t in reversed(done) if verify_checkpoint(ckpt_dir / t) is None), done[-1])
    ckpt_world = checkpoint_world_size(ckpt_dir / tag)
    allowed, refused = resume_changes(cfg.run_dir, config_to_dict(cfg), world_size,
                                      cfg.ds_config["train_batch_size"], ckpt_world)
    if refused:
        raise RunDirError(refused_message(cfg.run_dir, refused))
    return ResumePlan(step, tag, ckpt_world, allowed)


def _extensions_root() -> Path:
    import os
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root
    return Path(get_default_build_root())


def stale_build_locks(root: Path | None = None) -> list[Path]:
    """``lock`` files of JIT extension builds (``torch.utils.cpp_extension``'s ``FileBaton``, which
    DeepSpeed's op builders use) under ``root`` (default: ``TORCH_EXTENSIONS_DIR``, else PyTorch's
    default build root) that no live process is building: no process works in the lock's folder (the
    compiler and ninja run there while a build is under way)."""
    import psutil
    root = Path(root) if root is not None else _extensions_root()
    locks = [p for p in root.glob("*/lock")] + [p for p in root.glob("*/*/lock")] if root.is_dir() else []
    if not locks:
        return []
    busy: set[Path] = set()
    for proc in psutil.process_iter():
        try:
            busy.add(Path(proc.cwd()).resolve())
        except (psutil.Error, OSError):
            continue
    return [lock for lock in locks
            if not any(b == lock.parent.resolve() or lock.parent.resolve() in b.parents for b in busy)]


def preflight(cfg: Config, world_size: int, resume: bool = True, data: bool = False) -> list[str]:
    """Check what a launch of ``cfg`` on ``world_size`` ranks needs; returns notes for the user.

    Raises:
        PreflightError: the run directory is not writable or is in use, a resume is refused, the
            tokenizer is unusable, or (``data=True``) a unit cannot be packed.
    """
    notes: list[str] = []
    run_dir = cfg.run_dir
    try:
        check_writable(run_dir)
    except RunDirError as exc:
        raise PreflightError(str(exc)) from None
    holder = live_holder(run_dir)
    if holder is not None:
        raise PreflightError(f"run directory {run_dir} is in use by a live run (host {holder.get('host')}, "
                             f"process id {holder.get('pid')}); wait for it to end or choose another "
                             "logging.run_name")
    try:
        plan = resume_plan(cfg, world_size) if resume and cfg.checkpoint.resume else None
    except RunDirError as exc:
        raise PreflightError(str(exc)) from None
    if plan is not None:
        notes.append(f"resumes {run_dir} from step {plan.step}"
                     + (f" with changes: {'; '.join(plan.allowed)}" if plan.allowed else ""))
    stale = stale_build_locks()
    if stale:
        raise PreflightError(
            f"{stale[0]} is the lock of a JIT extension build that no process is running (a killed build "
            "left it); a launch that needs that op would wait for it without end. Remove it: rm "
            + " ".join(str(p) for p in stale))
    name = cfg.data.tokenizer.name
    if name is not None:
        from grape_ds.data.tokenizer import load_named
        local = Path(name).exists()
        if not local and name.startswith(("/", "./", "../", "~")):
            raise PreflightError(f"data.tokenizer.name: no such folder {name} (a local tokenizer is a folder "
                                 "written by save_pretrained; a hub name has no leading '/', './' or '~')")
        try:  # a hub name from the local cache only: pre-flight fetches nothing
            load_named(name, local_files_only=not local)
        except ValueError as exc:
            if local:
                raise PreflightError(str(exc)) from None
            notes.append(f"tokenizer {name!r} is not in the local hub cache: not checked here (the "
                         "ranks load it)")
    if data:
        from grape_ds.data import prepare_data
        try:
            packed = prepare_data(cfg.data)
        except (ValueError, OSError, RuntimeError) as exc:
            raise PreflightError(f"data: {exc}") from None
        from grape_ds.model import model_vocab_size
        try:
            model_vocab_size(cfg.model, packed.vocab_size)
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
        windows = {u: packed.num_windows(u, "train") for u in packed.units}
        notes.append(f"data packed in {packed.root}: vocabulary {packed.vocab_size}, train windows "
                     + ", ".join(f"{u} {n}" for u, n in windows.items()))
    return notes
