"""The training run: the one module that wires the components together.

Launch with the DeepSpeed launcher (one process per rank)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --module grape_ds.train \\
        --config yaml_configs/demo.yaml [--set a.b=c ...] [--no-resume] [--stop-at STEP]

Each optimizer step: every micro-batch is drawn by this rank's sampler, run forward/backward through
the engine and followed by ``engine.step()``; then, in order, the reweighting round (when due), logging,
evaluation and checkpointing, each deciding for itself whether this step is its turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from grape_ds import devices
from grape_ds.checkpoint import CheckpointError, Checkpointer, to_universal
from grape_ds.config import Config, ConfigError, config_to_dict, load_config
from grape_ds.controller import UPDATES_TASKS, MixtureController, RoundStats, mixture_batch_rows
from grape_ds.data import MixtureSampler, PackedData, mc_items_for, prepare_data
from grape_ds.data.rounds import TARGET_MIXTURE, TRAIN_MIXTURE, mixture_batches, unit_batches
from grape_ds.distributed import (adopt_slurm_env, all_reduce_sum, barrier, broadcast_object,
                                  get_local_rank, get_rank, get_world_size, is_collective_failure,
                                  lost_peers, rank_places, setup_logging)
from grape_ds.evaluation import Evaluator
from grape_ds.model import build_model
from grape_ds.monitor import build_monitor
from grape_ds.preflight import resume_plan
from grape_ds.probe import GradientProbe, Reduced
from grape_ds.rundir import (LOCK_FILE, RunDirError, RunLock, RunPaths, atomic_write_json, atomic_write_text,
                             truncate_jsonl)
from grape_ds.schedules import is_due

__all__ = ["Run", "build_run", "claim_run_dir", "train", "main", "parse_args", "DataError"]

log = logging.getLogger("grape_ds.train")


class DataError(ValueError):
    """The data cannot be packed: a source, a record or the tokenizer; the message names it."""


@dataclass
class LoopState:
    """What the loop itself must carry across a resume."""
    step: int = 0          # completed optimizer steps
    tokens: int = 0        # training tokens consumed, all ranks

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


@dataclass
class Run:
    cfg: Config
    paths: RunPaths
    data: PackedData
    engine: object
    sampler: MixtureSampler
    controller: MixtureController
    probe: GradientProbe | None
    checkpointer: Checkpointer
    evaluator: Evaluator
    monitor: object
    state: LoopState
    rank: int
    world_size: int
    precision: object      # grape_ds.engine.Precision: autocast and loss scaling of the engine
    mixture_batches: tuple[int, int] = (0, 0)  # research form: (train-mixture, target-mixture) rows
    lock: RunLock | None = None  # rank 0: the run directory's lock, released when the run ends
    places: list = dataclasses.field(default_factory=list)  # distributed.rank_places(): host of each rank


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------

def _write_run_files(cfg: Config, paths: RunPaths, places: list[dict]) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    atomic_write_json(paths.ds_config, cfg.ds_config)
    atomic_write_json(paths.ranks, places, indent=1)  # this launch's hosts


def _set_aside(run_dir: Path) -> bool:
    """Starting over: keep the previous attempt (renamed), never delete it. Whether there was one."""
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        log.warning("--no-resume: the previous contents of %s were moved to %s", run_dir, aside)
        return True
    return False


def claim_run_dir(cfg: Config, resume: bool, world_size: int) -> tuple[RunLock, tuple[int, str, int] | None]:
    """Rank 0, before anything of the run is read or written: lock the run directory (refusing a
    second live launch), set the previous attempt aside on ``--no-resume``, and check that a resume
    changes nothing its checkpoints cannot follow. Returns the lock and, when the checkpoint to resume
    was written on another number of ranks, ``(step, tag, its world size)`` after converting it to
    DeepSpeed's universal format (:func:`grape_ds.checkpoint.to_universal`).

    Raises:
        RunDirError: the directory is in use, the resume is refused (the message lists each change),
            or the conversion failed.
    """
    lock, universal = RunLock.acquire(cfg.run_dir), None
    try:
        if not resume and _set_aside(cfg.run_dir):  # moved with the folder, still held: lock anew
            old, lock = lock, RunLock.acquire(cfg.run_dir)
            old.release()
        elif resume and cfg.checkpoint.resume and (plan := resume_plan(cfg, world_size)) is not None:
            for change in plan.allowed:
                log.warning("resuming %s with a changed config: %s", cfg.run_dir, change)
            if plan.world_size is not None and plan.world_size != world_size:
                try:
                    to_universal(RunPaths(cfg.run_dir).checkpoints, plan.tag)
                except CheckpointError as exc:
                    raise RunDirError(f"cannot resume on {world_size} ranks: {exc}") from None
                universal = (plan.step, plan.tag, plan.world_size)
    except BaseException:
        lock.release()
        raise
    return lock, universal


def build_run(cfg: Config, resume: bool = True) -> Run:
    """Data, model, probe, engine, sampler, controller, monitor: everything a run needs, in that order.
    The run's files (``config.yaml``, ``ds_config.json``) are written only once its checkpoint has
    loaded, so an attempt that fails before then leaves the run directory as it was.

    Raises:
        RunDirError: the run directory is in use or the resume is refused (on every rank).
        DataError: a source, record or tokenizer cannot be packed (on the rank that packs).
    """
    from grape_ds import engine as ds_engine  # deepspeed import stays out of config-only commands

    ds_engine.init_distributed(cfg.deepspeed.timeout_minutes)
    rank, world_size = get_rank(), get_world_size()
    places = rank_places()
    if cfg.train.deterministic:
        devices.use_deterministic_algorithms()
    lock, refusal, universal = None, None, None
    if rank == 0:
        try:
            lock, universal = claim_run_dir(cfg, resume, world_size)
        except RunDirError as exc:
            refusal = str(exc)
    refusal, universal = broadcast_object((refusal, universal))
    if refusal is not None:
        raise RunDirError(refusal)

    try:
        data = prepare_data(cfg.data, local_rank=get_local_rank())
    except (ValueError, OSError, RuntimeError) as exc:  # what the pre-flight reports as data errors
        raise DataError(str(exc)) from exc
    # on the engine's device before the probe hooks it, so the probe's buffers are built there
    model = build_model(cfg.model, data.vocab_size, data.eot_id, seed=cfg.train.seed).to(devices.current())
    devices.seed_training_rng(cfg.train.seed, rank)  # dropout masks: a stream per rank, from the seed
    probe, batch_rows = None, mixture_batch_rows(cfg.mixture, cfg.probe)
    if cfg.mixture.adaptive:  # hooks before deepspeed.initialize
        # under fp16 a step can overflow and be skipped: its in-band contributions must be droppable
        staged = bool(cfg.ds_config.get("fp16", {}).get("enabled", False))
        rows = len(data.domains) + len(data.tasks) + sum(batch_rows)
        probe = GradientProbe.from_config(model, rows, cfg.probe, staged=staged)
    engine_cfg = cfg
    if universal is not None:  # another number of ranks: DeepSpeed loads the conversion (this launch
        # only: the run directory's ds_config.json keeps no load_universal for later resumes)
        ds = {**cfg.ds_config, "checkpoint": {**cfg.ds_config.get("checkpoint", {}), "load_universal": True}}
        engine_cfg = dataclasses.replace(cfg, ds_config=ds)
    engine = ds_engine.build_engine(model, engine_cfg)
    precision = ds_engine.precision(engine)
    if probe is not None:
        probe.to(engine.device)

    paths = RunPaths(cfg.run_dir)
    controller = MixtureController.from_config(cfg.mixture, data.domains, data.tasks)
    sampler = MixtureSampler([data.num_windows(d, "train") for d in data.domains], controller.alpha,
                             seed=cfg.train.seed, rank=rank, micro_batch_size=cfg.train.micro_batch_size,
                             mode=cfg.mixture.batch, data_hash=data.content_hash)
    state = LoopState()
    rank_states = {"sampler_counts": sampler.realised, "rng": devices.TrainingRNG(engine.device)}
    if probe is not None:
        rank_states["probe"] = probe
    checkpointer = Checkpointer.from_config(cfg.checkpoint, paths.checkpoints, engine,
                                            {"loop": state, "sampler": sampler, "controller": controller},
                                            rank_states)
    restored = checkpointer.load_latest(universal) if resume and cfg.checkpoint.resume else None
    if restored is not None:
        if "rng" in restored.missing and universal is not None:  # another number of ranks: fresh
            devices.seed_training_rng(cfg.train.seed * 1_000_003 + state.step, rank)  # dropout streams
        elif "rng" in restored.missing and cfg.model.dropout > 0:
            log.warning("the checkpoint holds no random state (made by an older grape-ds): dropout masks "
                        "after the resume differ from an uninterrupted run's")
        if state.step != engine.global_steps:
            raise RuntimeError(f"checkpoint step {state.step} != engine step {engine.global_steps}")
    if rank == 0:  # the checkpoint (if any) loaded: this launch's config becomes the run's
        _write_run_files(cfg, paths, places)
    if probe is not None:  # the projection of the round the next in-band steps feed
        probe.set_round(next_round_step(state.step, cfg.mixture.every))
    evaluator = Evaluator.from_config(cfg.eval, data, rank, world_size, paths.eval,
                                      mc_items=mc_items_for(cfg.data, cfg.eval.max_items),
                                      forward_context=precision.forward_context)
    if rank == 0:
        truncate_jsonl(paths.eval, state.step)
    if cfg.logging.trace_batches:
        truncate_jsonl(paths.trace(rank), state.step)
    monitor = build_monitor(rank, paths, data.domains, data.tasks, cfg.train.max_steps,
                            start_step=state.step, progress=cfg.logging.progress)
    devices.reset_peak_memory(engine.device)
    return Run(cfg, paths, data, engine, sampler, controller, probe, checkpointer, evaluator, monitor, state,
               rank, world_size, precision, batch_rows, lock, places)


# ----------------------------------------------------------------------------------------------
# The loop and its named steps
# ----------------------------------------------------------------------------------------------

def inband_due(run: Run, step: int) -> bool:
    """Whether optimizer step ``step`` (1-based) lies in the in-band window before a round."""
    if run.probe is None or run.cfg.probe.domains != "inband":
        return False
    every = run.cfg.mixture.every
    return is_due(step, every) or step % every > every - run.cfg.probe.window


def next_round_step(step: int, every: int) -> int:
    """The optimizer step the next round runs after, seen from completed step ``step``: it keys the
    gradient probe's projection for that round (``GradientProbe.set_round``)."""
    return (step // every + 1) * every


def _probe_rows(run: Run, batches: list[tuple[int, torch.Tensor]]) -> None:
    """One probe batch per buffer row (moved to the engine's device here): forward on
    ``engine.module`` and ``torch.autograd.grad``,
    which never reaches DeepSpeed's gradient hooks, ``p.grad`` or the optimizer. The random state of
    the CPU and of the engine's device is restored, so training draws nothing different (dropout
    masks included). Forwards run under the engine's autocast; under fp16 the loss is scaled like
    training's (so small gradients do not underflow) and the probe divides the scale back out."""
    probe, module = run.probe, run.engine.module
    with devices.isolated_rng(run.engine.device):
        for u, x in batches:
            x = x.to(run.engine.device)
            with run.precision.forward_context():
                loss = module(input_ids=x, labels=x).loss
            if run.precision.loss_scaling:
                _scaled_probe_gradient(run, u, loss, len(x))
            else:
                with probe.unit(u):
                    torch.autograd.grad(loss, probe.params)
                probe.record(u, loss, len(x))


def _scaled_probe_gradient(run: Run, unit: int, loss: torch.Tensor, sequences: int) -> None:
    """fp16: the probe batch's gradient of ``loss x scale`` (the engine's loss scale, so that small
    gradients do not underflow in fp16), divided by the scale in the probe. A probe batch has its own
    gradients, so it can overflow where the training step did not: then its contribution is
    dropped and it is redone at half the scale (as DeepSpeed's dynamic scaler would), down to 1."""
    probe, scale = run.probe, run.precision.loss_scale(run.engine)
    while True:
        with probe.unit(unit, scale=1.0 / scale):
            torch.autograd.grad(loss * scale, probe.params, retain_graph=scale > 1.0)
        if bool(torch.isfinite(probe.pending_row(unit)).all()) or scale <= 1.0:
            probe.record(unit, loss, sequences)
            probe.commit_step()  # a probe batch that overflows even unscaled leaves the round to skip
            return
        probe.discard_step()
        scale /= 2.0


def _unmeasured_domains(run: Run) -> list[int]:
    """In-band domains that no rank drew in the window (one small all-reduce): they get probe batches,
    so every domain is measured every round and the task update's train direction keeps every
    domain's alpha mass (README, "Reweighting")."""
    k = len(run.data.domains)
    drawn = all_reduce_sum(run.probe.contributions()[:k]).tolist()
    return [d for d in range(k) if drawn[d] == 0]


def measure_round(run: Run, step: int) -> tuple[RoundStats, int]:
    """Every row of the round, reduced over all ranks: ``(stats, in-band domains probed because no
    rank drew them)``.

    Phase one: probe batches for the tasks (and the domains: all of them with ``probe.domains:
    probe``, the unmeasured ones in-band) and, in the research form, the train-mixture batches; one
    all-reduce. The research form of a method that moves z first then draws its target-mixture
    batches from the z that the task update gives (rank 0 computes it from phase one and broadcasts
    it, :meth:`MixtureController.preview_z`) and reduces them in a second, smaller all-reduce, as
    the research code samples its target mixture after the task update. Then the probe takes the
    projection of the next round."""
    cfg, probe, ctl = run.cfg, run.probe, run.controller
    k, n = len(run.data.domains), len(run.data.tasks)
    e_rows, c_rows = run.mixture_batches
    if cfg.probe.domains == "probe":
        missing, units = [], list(range(k + n))
    else:
        missing = _unmeasured_domains(run)
        units = missing + list(range(k, k + n))
    data, draw = run.data, {"seed": cfg.train.seed, "rank": run.rank, "step": step}
    size = cfg.probe.mixture_batch_size or cfg.train.micro_batch_size
    batches = unit_batches(data, units, cfg.probe.batch_size, **draw)
    batches += mixture_batches(data, TRAIN_MIXTURE, run.sampler.probs, k + n, e_rows, size, **draw)
    two_phase = c_rows > 0 and ctl.method in UPDATES_TASKS
    if c_rows and not two_phase:
        batches += mixture_batches(data, TARGET_MIXTURE, ctl.z, k + n + e_rows, c_rows, size, **draw)
    _probe_rows(run, batches)
    reduced = probe.reduce(slice(0, k + n + e_rows) if two_phase else slice(None))
    if two_phase:
        z_next = broadcast_object(ctl.preview_z(_round_stats(run, reduced, e_rows, 0)).tolist()
                                  if run.rank == 0 else None)  # only rank 0's controller needs the Gram
        _probe_rows(run, mixture_batches(data, TARGET_MIXTURE, z_next, k + n + e_rows, c_rows, size, **draw))
        reduced = reduced.cat(probe.reduce(slice(k + n + e_rows, None)))
    probe.set_round(next_round_step(step, cfg.mixture.every))
    return _round_stats(run, reduced, e_rows, c_rows), len(missing)


def _round_stats(run: Run, reduced: Reduced, train_batches: int, target_batches: int) -> RoundStats:
    losses, gram, counts = reduced.host()
    return RoundStats(losses=losses, gram=gram, counts=counts, num_domains=len(run.data.domains),
                      train_batches=train_batches, target_batches=target_batches)


def run_mixture_round(run: Run, step: int) -> None:
    """The reweighting round, at an accumulation boundary after optimizer step ``step``: every row
    measured (:func:`measure_round`), the controller's update on rank 0, and a broadcast of its
    state; every rank's sampler takes the new alpha at its next draw."""
    stats, missing = measure_round(run, step) if run.probe is not None else (None, 0)
    if run.rank == 0:
        run.controller.round(step, stats)
    run.controller.load_state_dict(broadcast_object(run.controller.state_dict(history=False)))
    run.sampler.set_weights(run.controller.alpha)
    if stats is not None:
        log_round(run, step, stats, missing)


def log_round(run: Run, step: int, stats: RoundStats, missing: int) -> None:
    """Per unit: loss and gradient norm (a unit nobody measured is left out, not logged as 0); per
    domain: its alignment score and its cosine with every task's gradient
    (``reweight/cosine/<domain>/<task>``: do the domains' gradients help or conflict with each
    task?); how many in-band domains needed a probe batch."""
    d, t = stats.rows("domains"), stats.rows("tasks")
    units = run.data.domains + run.data.tasks
    norms = np.sqrt(np.maximum(np.diag(stats.gram), 0.0))
    measured = [u for u in range(len(units)) if stats.counts[u] > 0]
    m = run.monitor
    m.vector(step, "reweight/loss", [units[u] for u in measured], stats.losses[measured])
    m.vector(step, "reweight/grad_norm", [units[u] for u in measured], norms[measured])
    alignment = run.controller.last_diagnostics.get("alignment")
    if alignment is not None:
        m.vector(step, "reweight/alignment", run.data.domains, alignment)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = stats.gram[d, t] / np.outer(norms[d], norms[t])  # [K, N]
    for k, domain in enumerate(run.data.domains):
        names = [f"{domain}/{task}" for task in run.data.tasks]
        ok = [j for j in range(len(run.data.tasks)) if np.isfinite(cosine[k, j])]
        m.vector(step, "reweight/cosine", [names[j] for j in ok], cosine[k, ok])
    m.scalars(step, {"reweight/inband_probed": missing})


def log_weights(run: Run, step: int) -> None:
    """The weights in use and their averages; once per step that has a round or is a logging step."""
    m, c = run.monitor, run.controller
    m.vector(step, "mixture/domain", run.data.domains, run.sampler.probs)
    m.vector(step, "mixture/task", run.data.tasks, c.z)
    m.vector(step, "mixture_avg/domain", run.data.domains, c.alpha_avg)
    m.vector(step, "mixture_avg/task", run.data.tasks, c.z_avg)


def log_step(run: Run, step: int, loss: float, lr: float, tokens_per_sec: float) -> None:
    counts = torch.from_numpy(run.sampler.realised.take().astype(np.float64)).to(run.engine.device)
    counts = all_reduce_sum(counts).cpu().numpy()  # [K], all ranks
    realised = (counts / counts.sum()).tolist() if counts.sum() > 0 else counts.tolist()
    memory, _ = devices.peak_memory_bytes(run.engine.device)
    run.monitor.scalars(step, {"train/loss": loss, "train/lr": lr, "train/tokens_per_sec": tokens_per_sec,
                               "train/peak_memory_gib": memory / 2**30})
    run.monitor.vector(step, "mixture/realised", run.data.domains, realised)
    log_weights(run, step)


def save_checkpoint(run: Run) -> None:
    run.checkpointer.save(run.state.step)
    write_mixture_json(run)


def write_mixture_json(run: Run) -> None:
    if run.rank == 0:
        atomic_write_json(run.paths.mixture, run.controller.summary())


class StopRequest:
    """SIGTERM / SIGUSR1 (preemption, or SLURM's warning before the time limit) ask the loop to save a
    checkpoint at the next step boundary and exit cleanly; the same command later resumes."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested: int | None = None

    def install(self) -> "StopRequest":
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.requested).name if self.requested is not None else None


def train(run: Run, stop_at: int | None = None, stop: StopRequest | None = None) -> dict:
    """Train to ``train.max_steps`` (or to ``stop_at``, or until a stop is requested), saving a
    checkpoint where it ends."""
    cfg, engine, st = run.cfg, run.engine, run.state
    stop = stop or StopRequest()
    gas = cfg.train.gradient_accumulation_steps
    tokens_per_step = cfg.train.micro_batch_size * gas * run.world_size * cfg.data.seq_len
    last = min(stop_at if stop_at is not None else cfg.train.max_steps, cfg.train.max_steps)
    trace = None
    if cfg.logging.trace_batches:
        run.paths.trace(run.rank).parent.mkdir(parents=True, exist_ok=True)
        trace = run.paths.trace(run.rank).open("a")
    engine.train()
    window_start, window_tokens = time.perf_counter(), 0
    while st.step < last:
        lr = engine.get_lr()[0]
        inband = inband_due(run, st.step + 1)
        # [loss sum over micro-batches, micro-batches, stop requested], on the device: one all_reduce
        # and one host sync per step
        totals = torch.zeros(3, dtype=torch.float64, device=engine.device)
        for micro in range(gas):
            draw = run.sampler.draw(st.step, micro)
            if trace is not None:
                trace.write(json.dumps({"step": st.step + 1, "micro": micro, "domains": draw.domains.tolist(),
                                        "windows": draw.windows.tolist()}) + "\n")
            x = run.data.batch([run.data.domains[d] for d in draw.domains], draw.windows).to(engine.device)
            loss = engine(input_ids=x, labels=x).loss
            if inband:  # engine.backward scales the loss by loss_scale / gas; the probe undoes it
                with run.probe.unit(draw.pure_domain, scale=gas / run.precision.loss_scale(engine)):
                    engine.backward(loss)
                run.probe.record(draw.pure_domain, loss, len(x))
            else:
                engine.backward(loss)
            engine.step()
            totals[0] += loss.detach()
            totals[1] += 1.0
        if inband and run.probe.staged:  # fp16: a step skipped on overflow contributes nothing
            if engine.was_step_applied():
                run.probe.commit_step()
            else:
                run.probe.discard_step()
                log.warning("step %d overflowed (fp16) and was skipped; its in-band gradients are left "
                            "out of the round", st.step + 1)
        st.step += 1
        st.tokens += tokens_per_step
        window_tokens += tokens_per_step
        totals[2] = float(stop.requested is not None)
        loss_total, micro_batches, stops = all_reduce_sum(totals).tolist()  # any rank signalled?
        step_loss = loss_total / micro_batches
        run.monitor.record(st.step, {"loss": step_loss, "lr": lr, "tokens": st.tokens, "time": time.time()})
        if not np.isfinite(step_loss):
            raise FloatingPointError(f"training loss is {step_loss} at step {st.step}; stopping "
                                     "(lower train.lr or check the data)")

        round_now = is_due(st.step, cfg.mixture.every)
        if round_now:
            run_mixture_round(run, st.step)
            if trace is not None:
                trace.write(json.dumps({"step": st.step, "alpha": run.controller.alpha.tolist(),
                                        "z": run.controller.z.tolist()}) + "\n")
        if is_due(st.step, cfg.logging.every) or st.step == last:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed if elapsed > 0 else float("nan")
            log_step(run, st.step, step_loss, lr, tps)
            run.monitor.progress(st.step, loss=step_loss, tok_s=round(tps))
            window_start, window_tokens = time.perf_counter(), 0
        elif round_now:  # log_step logs the weights; between logging steps a round logs its own
            log_weights(run, st.step)
        if run.evaluator.due(st.step):
            run.evaluator.run(engine.module, st.step, run.monitor)
        if run.checkpointer.due(st.step):
            save_checkpoint(run)
        if stops > 0:  # preemption: all ranks stop at this same step boundary
            log.warning("stop requested (%s): saving a checkpoint at step %d and exiting",
                        stop.name or "signal on another rank", st.step)
            break

    if trace is not None:
        trace.close()
    if run.checkpointer.last_saved != st.step:  # before the final evaluation: nothing it does can lose it
        save_checkpoint(run)
    write_mixture_json(run)
    result = {}
    if st.step >= cfg.train.max_steps and not run.evaluator.due(st.step):
        result = run.evaluator.run(engine.module, st.step, run.monitor)
    run.monitor.close()
    return result


def _final_message(paths: RunPaths, finished: bool) -> str:
    state = "finished" if finished else "stopped (resume by running the same command again)"
    return "\n".join([
        f"grape-ds: run {state}: {paths.root}",
        f"  TensorBoard logs : {paths.tensorboard}",
        f"  checkpoints      : {paths.checkpoints}",
        f"  mixture weights  : {paths.mixture}",
        f"  metrics          : {paths.metrics} and {paths.eval}",
        f"  open TensorBoard : tensorboard --logdir {paths.tensorboard}  (then http://localhost:6006)",
    ])


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="grape_ds.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if the run directory has a checkpoint")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save a checkpoint and exit after this optimizer step (resume later)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


def write_status(run: Run, stop: StopRequest, stop_at: int | None) -> None:
    """``<run>/status.json`` (rank 0): whether the run finished or stopped early, and why. Launchers
    read it to decide whether to requeue."""
    if run.rank != 0:
        return
    finished = run.state.step >= run.cfg.train.max_steps
    reason = None if finished else (stop.name or (f"--stop-at {stop_at}" if stop_at is not None
                                                  else "a stop requested on another rank"))
    memory, kind = devices.peak_memory_bytes(run.engine.device)
    atomic_write_json(run.paths.status, {"state": "finished" if finished else "stopped", "step": run.state.step,
                                         "max_steps": run.cfg.train.max_steps, "reason": reason,
                                         "peak_memory_bytes": memory, "peak_memory_kind": kind,
                                         "time": time.time()}, indent=None)


def _leave_after_collective_failure(run: Run, exc: Exception) -> None:
    """A dead or stuck rank: say so plainly and leave at once; tearing down a broken process group
    can block, and the launcher (deepspeed, srun --kill-on-bad-exit) ends the other ranks."""
    saved = run.checkpointer.last_saved
    log.error("rank %d: a collective failed at step %d: another rank died or did not answer within "
              "deepspeed.timeout_minutes=%g; lost: %s. The job stops; run the same command again to "
              "resume from the newest complete checkpoint%s. (%s: %s)", run.rank, run.state.step,
              run.cfg.deepspeed.timeout_minutes, lost_peers(exc, run.places, run.rank) or "?",
              f" (step {saved})" if saved else "", type(exc).__name__,
              str(exc).splitlines()[0] if str(exc) else "")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(3)


def _shutdown(in_step: bool) -> None:
    """Leave the process group before the interpreter exits, on every way out of :func:`main`. A
    process that exits with its gloo/NCCL group still alive can abort in C++ teardown ("terminate
    called without an active exception", exit status 250 or SIGABRT): seen after a finished run and
    after a refused resume. ``in_step``: every rank got here together (a finished or stopped run), so
    a barrier first lets the last collective complete everywhere."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if in_step:
            barrier()
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - leaving anyway; say why the group did not close cleanly
        log.warning("leaving the process group failed (%s: %s)", type(exc).__name__, exc)


def main(argv=None) -> int:
    """One rank of a run. Exit status: 0 when the run finished or stopped cleanly (SIGTERM/SIGUSR1,
    ``--stop-at``; ``status.json`` says which), 1 when a checkpoint could not be written (a full disk;
    the previous complete one is intact), 2 for a config, data or run-directory error (one message,
    no traceback, nothing of an existing run changed), 3 when another rank died or a collective timed
    out."""
    args = parse_args(argv)
    setup_logging()
    adopt_slurm_env()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"grape-ds: config error: {exc}", file=sys.stderr)
        return 2
    run, clean = None, False
    try:
        with devices.check_from_env():  # GRAPE_DS_CHECK_DEVICES: fail on the CPU where a GPU would
            try:
                run = build_run(cfg, resume=not args.no_resume)
            except (RunDirError, DataError) as exc:
                kind = "data error" if isinstance(exc, DataError) else "run directory error"
                print(f"grape-ds: {kind}: {exc}", file=sys.stderr, flush=True)
                return 2
            # from here on SIGTERM/SIGUSR1 mean "checkpoint and stop"; before, they end the process
            stop = StopRequest().install()
            try:
                train(run, stop_at=args.stop_at, stop=stop)
            except CheckpointError as exc:  # a full disk: one plain message, not DeepSpeed's
                print(f"grape-ds: checkpoint error (rank {run.rank}): {exc}", file=sys.stderr, flush=True)
                return 1
            except Exception as exc:
                if not is_collective_failure(exc):
                    raise
                _leave_after_collective_failure(run, exc)
        write_status(run, stop, args.stop_at)
        if run.rank == 0:
            print(_final_message(run.paths, run.state.step >= cfg.train.max_steps), flush=True)
        clean = True
        return 0
    finally:
        if run is not None and run.lock is not None:
            run.lock.release()
        _shutdown(in_step=clean)


if __name__ == "__main__":
    sys.exit(main())
