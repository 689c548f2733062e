"""``grape-ds bench``: the figures behind the README's performance section.

Four parts; each prints a table and, as its last line, one JSON object with its figures.

* ``throughput``: for a named model size (``tiny``, GPT-2 ``124m``, ``350m``) and a precision, a
  plain-PyTorch training loop (same model, batches, AdamW, schedule and clipping; no DeepSpeed),
  grape-ds ``static`` and grape-ds ``grape`` with a round every 100 and every 10 steps, alternating in
  one invocation, each in its own process: tokens/s per device, model FLOPs utilisation, peak device
  memory, and the ratios static / plain and grape / static.

* ``overhead``: the same config trained with ``static`` and with ``grape`` (a round every 10 and every
  100 steps), 2 ranks under the ``deepspeed`` launcher, alternating in one invocation; tokens/s of
  each and the ratios grape/static. Then, in one process, the cost of our round against a
  reference-style round (probe batches for every domain and task plus the mixture batches, full
  flattened gradients), and the probe's memory.
* ``fidelity``: on a small GPT-2, the sketch against the exact estimator on the same batches, round
  after round: the relative Frobenius error of the Gram matrix, and the drift of alpha and z (their
  largest difference from the exact estimator's) after 10 and 50 rounds, for a sketch drawn afresh
  every round (what a run does) and for one projection kept for the whole run.
* ``planted``: ``static``, ``doge`` and ``grape`` on the planted corpus (2 ranks); each run's final
  alpha and z next to the corpus's ground truth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from transformers import GPT2LMHeadModel

from grape_ds import devices
from grape_ds.config import Config, load_config
from grape_ds.controller import UPDATES_TASKS, MixtureController, RoundStats, mixture_batch_rows
from grape_ds.data import MixtureSampler, ground_truth, prepare_data
from grape_ds.data.rounds import TARGET_MIXTURE, TRAIN_MIXTURE, mixture_batches, unit_batches
from grape_ds.data.sampler import probe_windows
from grape_ds.distributed import free_port
from grape_ds.launch import train_command
from grape_ds.model import build_model, gpt2_config
from grape_ds.probe import GradientProbe, Reduced
from grape_ds.rundir import RunPaths, read_jsonl
from grape_ds.schedules import lr_multiplier_fn

__all__ = ["main", "launch_run"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def launch_run(config: str, overrides: list[str], world_size: int = 2, timeout_s: float = 1800,
               args: tuple[str, ...] = (), fresh: bool = True, launcher: bool = True) -> Path:
    """Train ``config`` with ``world_size`` ranks under the deepspeed launcher; returns the run dir.

    ``fresh`` starts over (``--no-resume``); otherwise an existing run directory is resumed. ``args``
    go to ``grape_ds.train`` (``--stop-at N``). A run that outlives ``timeout_s`` is killed (with its
    ranks) and reported, never waited on forever. The launcher runs as ``python -m
    deepspeed.launcher.runner`` with this interpreter, so it works where no ``deepspeed`` script is
    on the PATH (packages installed with ``pip --target``). ``launcher=False`` runs one rank as a
    plain process (a 1-process group; the launcher's own start-up, seconds, is left out)."""
    if not launcher and world_size != 1:
        raise ValueError("launcher=False runs a single rank")
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size),
              "--master_port", str(free_port())]
    cmd = train_command(config, ["logging.progress=false", *overrides], [*(["--no-resume"] if fresh else []), *args],
                        launcher=runner if launcher else None)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise RuntimeError(f"bench run {' '.join(overrides)} did not finish in {timeout_s:g} s; killed. "
                           f"Last output:\n{out[-4000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"bench run failed ({proc.returncode}):\n{out[-4000:]}")
    cfg = load_config(config, overrides, world_size=world_size)
    return cfg.run_dir


def _throughput(run_dir: Path, skip: int) -> float:
    """Training tokens/s after the first ``skip`` steps (start-up and compilation excluded)."""
    rows = read_jsonl(RunPaths(run_dir).metrics)
    a, b = rows[skip - 1], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["time"] - a["time"])


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _single_process_env() -> None:
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)


def _unit_batch(data, cfg: Config, name: str, u: int, step: int, size: int) -> torch.Tensor:
    windows = probe_windows(data.num_windows(name, "train"), size, seed=cfg.train.seed, rank=0,
                            step=step, unit=u)
    return data.batch(name, windows)


def _probe_offline(model, probes: list[GradientProbe], batches) -> None:
    """Each ``(row, batch)``: one forward and ``torch.autograd.grad``, seen by every probe."""
    for u, x in batches:
        loss = model(input_ids=x, labels=x).loss
        with ExitStack() as stack:
            for p in probes:
                stack.enter_context(p.unit(u))
            torch.autograd.grad(loss, probes[0].params)
        for p in probes:
            p.record(u, loss.item(), len(x))


def _stats(reduced: Reduced, k: int, e: int, c: int) -> RoundStats:
    return RoundStats(*reduced.host(), k, e, c)


def _offline_round(cfg: Config, data, model, probes: list[GradientProbe], ctl: MixtureController,
                   step: int, units: list[int]) -> list[RoundStats]:
    """One round on one process, as ``grape_ds.train.measure_round`` measures it: probe batches for
    ``units``, the research form's train-mixture batches (from ``ctl``'s alpha) and target-mixture
    batches (from the z the task update gives, after a first reduction). Every probe sees the same
    batches; returns each probe's statistics."""
    k, n = len(data.domains), len(data.tasks)
    e, c = mixture_batch_rows(cfg.mixture, cfg.probe)
    draw = {"seed": cfg.train.seed, "rank": 0, "step": step}
    size = cfg.probe.mixture_batch_size or cfg.train.micro_batch_size
    batches = unit_batches(data, units, cfg.probe.batch_size, **draw)
    batches += mixture_batches(data, TRAIN_MIXTURE, ctl.alpha, k + n, e, size, **draw)
    two_phase = c > 0 and ctl.method in UPDATES_TASKS
    if c and not two_phase:
        batches += mixture_batches(data, TARGET_MIXTURE, ctl.z, k + n + e, c, size, **draw)
    _probe_offline(model, probes, batches)
    if not two_phase:
        return [_stats(p.reduce(), k, e, c) for p in probes]
    first = [p.reduce(slice(0, k + n + e)) for p in probes]
    z_next = ctl.preview_z(_stats(first[0], k, e, 0))
    _probe_offline(model, probes, mixture_batches(data, TARGET_MIXTURE, z_next, k + n + e, c, size, **draw))
    return [_stats(part.cat(p.reduce(slice(k + n + e, None))), k, e, c) for p, part in zip(probes, first)]


# ----------------------------------------------------------------------------------------------
# overhead
# ----------------------------------------------------------------------------------------------

def _round_costs(cfg: Config, repeats: int = 5) -> dict:
    """Seconds per round, ours vs reference-style, on one process with the config's model."""
    _single_process_env()
    torch.set_num_threads(1)
    data = prepare_data(cfg.data)
    model = build_model(cfg.model, data.vocab_size, data.eot_id, seed=cfg.train.seed)
    k, n = len(data.domains), len(data.tasks)
    rows = k + n + sum(mixture_batch_rows(cfg.mixture, cfg.probe))
    probe = GradientProbe.from_config(model, rows, cfg.probe)
    params = probe.params
    b, mb, b_r, tau = cfg.probe.batch_size, cfg.train.micro_batch_size, 2, cfg.mixture.unit_clip or 1.0
    grape = dataclasses.replace(cfg.mixture, method="grape", weights=None, task_weights=None)
    ctl = MixtureController.from_config(grape, data.domains, data.tasks)
    units = list(range(k, k + n)) if cfg.probe.domains == "inband" else list(range(k + n))

    def ours(step):  # in-band domains come from the training micro-batches (timed below)
        (stats,) = _offline_round(cfg, data, model, [probe], ctl, step, units)
        ctl.round(step, stats)
        probe.set_round(step + 1)

    def flat_clipped(x, log_loss=False):
        loss = model(input_ids=x, labels=x).loss
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(torch.log(loss) if log_loss else loss, params)])
        return g * min(1.0, tau / (g.norm().item() + 1e-12))

    def reference(step):
        # research code: B_r mixture batches (train direction) + one batch per task, then B_r
        # target-mixture batches + one batch per domain; every gradient flattened to a P-vector.
        u = sum(flat_clipped(_unit_batch(data, cfg, data.domains[r % k], r, step, mb)) for r in range(b_r)) / b_r
        scores_t = [flat_clipped(_unit_batch(data, cfg, t, k + n, step, b), True) @ u for n, t in enumerate(data.tasks)]
        v = sum(flat_clipped(_unit_batch(data, cfg, data.tasks[r % len(data.tasks)], k + r, step, mb), True)
                for r in range(b_r)) / b_r
        scores_d = [flat_clipped(_unit_batch(data, cfg, d, i, step, b)) @ v for i, d in enumerate(data.domains)]
        return scores_t, scores_d

    def timed(fn):
        fn(0)  # warm-up
        t = time.perf_counter()
        for r in range(repeats):
            fn(r + 1)
        return (time.perf_counter() - t) / repeats

    # in-band cost: the hooks during the window's backward passes, timed against the same backward
    x = _unit_batch(data, cfg, data.domains[0], 0, 0, mb)

    def backward(active: bool):
        def run(step):
            loss = model(input_ids=x, labels=x).loss
            with probe.unit(0) if active else ExitStack():
                loss.backward()
            model.zero_grad(set_to_none=True)
        return run
    hook_extra = max(0.0, timed(backward(True)) - timed(backward(False)))
    probe.reduce()
    gas = cfg.train.gradient_accumulation_steps
    inband = hook_extra * gas * cfg.probe.window if cfg.probe.domains == "inband" else 0.0
    ours_s = timed(ours) + inband
    ref_s = timed(reference)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"our_round_s": ours_s, "our_inband_hooks_s": inband, "reference_round_s": ref_s,
            "round_speedup": ref_s / ours_s, "probe_memory_bytes": probe.memory_bytes(),
            "param_bytes": param_bytes, "probe_memory_over_params": probe.memory_bytes() / param_bytes,
            "reference_extra_memory_bytes": 3 * 4 * probe.numel}


def bench_overhead(config: str, steps: int, repeats: int, periods: list[int], out: Path,
                   overrides: list[str] = ()) -> dict:
    variants = [("static", ["mixture.method=static", "mixture.every=0"])]
    variants += [(f"grape/{p}", ["mixture.method=grape", f"mixture.every={p}"]) for p in periods]
    common = [*overrides, f"train.max_steps={steps}", "eval.every=0", "eval.max_windows=8", "checkpoint.every=0",
              f"logging.output_dir={out}", f"train.warmup_steps={min(10, steps // 10)}"]
    tps: dict[str, list[float]] = {name: [] for name, _ in variants}
    for r in range(repeats):  # alternate, so drift of the machine hits every variant alike
        for name, sets in variants:
            run = launch_run(config, [*common, *sets, f"logging.run_name=overhead-{name.replace('/', '')}-{r}"])
            tps[name].append(_throughput(run, skip=max(5, steps // 10)))
    base = float(np.median(tps["static"]))
    rows, fig = [], {"steps": steps, "repeats": repeats}
    for name, _ in variants:
        med = float(np.median(tps[name]))
        rows.append([name, med, med / base, " ".join(f"{v:.0f}" for v in tps[name])])
        fig[f"tokens_per_sec/{name}"] = med
        if name != "static":
            fig[f"ratio/{name}"] = med / base
    print(_table(["variant", "tokens/s (median)", "vs static", "runs"], rows))
    costs = _round_costs(load_config(config, [*overrides, f"logging.output_dir={out}"], world_size=2))
    print()
    print(_table(["round", "seconds"], [["ours (task probes + in-band hooks + reduce + update)", costs["our_round_s"]],
                                          ["reference-style (all units + mixture batches, flat P-vectors)", costs["reference_round_s"]],
                                          ["reference / ours", costs["round_speedup"]]]))
    print(f"probe memory: {costs['probe_memory_bytes'] / 2**20:.2f} MiB "
          f"({100 * costs['probe_memory_over_params']:.1f}% of the parameters' "
          f"{costs['param_bytes'] / 2**20:.2f} MiB); the reference holds ~3 flat fp32 P-vectors "
          f"({costs['reference_extra_memory_bytes'] / 2**20:.2f} MiB)")
    fig.update(costs)
    return fig


# ----------------------------------------------------------------------------------------------
# fidelity
# ----------------------------------------------------------------------------------------------

def bench_fidelity(config: str, overrides: list[str], rounds: int, steps_between: int,
                   report: list[int]) -> dict:
    """The sketch against the exact estimator on the same batches, round after round: one sketch
    drawn afresh every round (what a run does) and, for comparison, one projection kept for the whole
    run. Every probe batch is seen by the three; each estimator drives its own controller (the
    batches are drawn from the exact one's weights). The model trains between rounds on a uniform
    mixture, so the gradients change."""
    _single_process_env()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(config, ["mixture.method=grape", *overrides], world_size=1)
    data = prepare_data(cfg.data)
    model = build_model(cfg.model, data.vocab_size, data.eot_id, seed=cfg.train.seed)
    k, n = len(data.domains), len(data.tasks)
    rows = k + n + sum(mixture_batch_rows(cfg.mixture, cfg.probe))
    names = ("exact", "fresh", "fixed")
    sketch = dataclasses.replace(cfg.probe, estimator="sketch")
    probes = [GradientProbe(model, rows, "exact"), GradientProbe.from_config(model, rows, sketch),
              GradientProbe.from_config(model, rows, sketch)]
    ctl = {name: MixtureController.from_config(cfg.mixture, data.domains, data.tasks) for name in names}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    rng = np.random.default_rng(cfg.train.seed)
    table, fig = [], {"sketch_dim": cfg.probe.dim, "rounds": rounds, "form": cfg.mixture.form}
    errors = {"fresh": [], "fixed": []}
    for r in range(rounds):
        probes[1].set_round(r + 1)  # fresh: a new projection every round; fixed: the first one throughout
        stats = _offline_round(cfg, data, model, probes, ctl["exact"], r + 1, list(range(k + n)))
        ge = torch.from_numpy(stats[0].gram)
        for name, st in zip(names, stats):
            if name != "exact":
                errors[name].append(float((torch.from_numpy(st.gram) - ge).norm() / ge.norm()))
            ctl[name].round(r + 1, st)
        drift = {name: (float(np.abs(ctl[name].alpha - ctl["exact"].alpha).max()),
                        float(np.abs(ctl[name].z - ctl["exact"].z).max())) for name in ("fresh", "fixed")}
        if r + 1 in report or r + 1 == rounds:
            table.append([r + 1, errors["fresh"][-1], *drift["fresh"], errors["fixed"][-1], *drift["fixed"]])
            for name in ("fresh", "fixed"):
                fig[f"{name}/alpha_drift@{r + 1}"], fig[f"{name}/z_drift@{r + 1}"] = drift[name]
        for _ in range(steps_between):  # move the model so every round sees new gradients
            d = data.domains[rng.integers(k)]
            w = data.windows(d, "train")
            x = torch.from_numpy(np.stack([w[i] for i in rng.integers(len(w), size=cfg.train.micro_batch_size)]).astype(np.int64))
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    print(_table(["round", "fresh: Gram rel. error", "max |d alpha|", "max |d z|",
                  "fixed: Gram rel. error", "max |d alpha|", "max |d z|"], table))
    for name in ("fresh", "fixed"):
        fig[f"{name}/gram_rel_error_mean"] = float(np.mean(errors[name]))
        fig[f"{name}/gram_rel_error_max"] = float(np.max(errors[name]))
    fig.update(alpha_exact=ctl["exact"].alpha.tolist(), alpha_fresh=ctl["fresh"].alpha.tolist(),
               alpha_fixed=ctl["fixed"].alpha.tolist())
    return fig


# ----------------------------------------------------------------------------------------------
# planted
# ----------------------------------------------------------------------------------------------

def planted_figures(mixture: dict, truth) -> dict:
    """The relevant domains' total weight over their uniform share, and the top task: of the last
    weights, and of the weights averaged over the rounds (the mixture the paper reports)."""
    idx = [mixture["domains"].index(d) for d in truth.relevant_domains]
    uniform = len(idx) / len(mixture["alpha"])
    out = {"alpha": mixture["alpha"], "z": mixture["z"], "alpha_avg": mixture["alpha_avg"], "z_avg": mixture["z_avg"]}
    for suffix, alpha, z in (("", mixture["alpha"], mixture["z"]), ("_avg", mixture["alpha_avg"], mixture["z_avg"])):
        share = float(np.asarray(alpha)[idx].sum())
        top = mixture["tasks"][int(np.argmax(z))]
        out.update({f"relevant_share{suffix}": share, f"relevant_over_uniform{suffix}": share / uniform,
                    f"top_task{suffix}": top, f"top_task_is_hard{suffix}": top == truth.hard_task})
    return out


def bench_planted(config: str, overrides: list[str], out: Path) -> dict:
    cfg = load_config(config, overrides, world_size=2)
    truth = ground_truth(cfg.data.planted)
    fig, rows = {"relevant_domains": list(truth.relevant_domains), "hard_task": truth.hard_task}, []
    for method in ("static", "doge", "grape"):
        sets = [*overrides, f"mixture.method={method}", f"logging.output_dir={out}", f"logging.run_name=planted-{method}"]
        if method == "static":
            sets.append("mixture.every=0")
        run = launch_run(config, sets)
        f = planted_figures(json.loads(RunPaths(run).mixture.read_text()), truth)
        fig[method] = f
        rows.append([method, f["relevant_share"], f["relevant_over_uniform"], f["top_task"], f["top_task_avg"],
                     " ".join(f"{a:.3f}" for a in f["alpha"]), " ".join(f"{v:.3f}" for v in f["z"]),
                     " ".join(f"{v:.3f}" for v in f["z_avg"])])
    print(f"ground truth: relevant domains {list(truth.relevant_domains)} (uniform share "
          f"{len(truth.relevant_domains) / len(cfg.domain_names):.3f}), hard task {truth.hard_task}")
    print(_table(["method", "relevant share", "x uniform", "top task", "top task (avg z)", "alpha", "z",
                  "z (avg)"], rows))
    return fig


# ----------------------------------------------------------------------------------------------
# throughput
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSize:
    """A named model for ``bench throughput`` (sizes from GPT-2; ``tiny`` is the demo's, for CPUs)."""
    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int                # also the context length
    vocab_size: int | None      # padded embedding (null: the tokenizer's)
    micro_batch_size: int       # sequences per rank and micro-batch
    gradient_accumulation_steps: int


MODEL_SIZES = {
    "tiny": ModelSize(2, 128, 4, 128, None, 8, 2),
    # GPT-2 124M as the paper trains it: 32 sequences of 1024 tokens per step (16 x 2 on one device);
    # the vocabulary is GPT-2's 50257 padded to 50304 (nanoGPT), whatever the tokenizer holds
    "124m": ModelSize(12, 768, 12, 1024, 50304, 16, 2),
    "350m": ModelSize(24, 1024, 16, 1024, 50304, 8, 4),
}

# precision -> DeepSpeed JSON; the plain-PyTorch loop runs torch.autocast in that dtype (fp16 with a
# GradScaler), the usual PyTorch recipe, with fp32 weights
PRECISIONS = {
    "fp32": ("ds_configs/zero2_fp32.json", None),
    "bf16": ("ds_configs/zero2_bf16.json", torch.bfloat16),
    "bf16_autocast": ("ds_configs/zero2_bf16_autocast.json", torch.bfloat16),
    "fp16": ("ds_configs/zero2_fp16.json", torch.float16),
}

# Dense peak FLOP/s per device from the vendors' datasheets (SXM parts, no sparsity), matched by a
# substring of torch.cuda.get_device_name(). fp32 is the CUDA-core rate (PyTorch does not use TF32
# for fp32 matrix products by default).
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12},
}


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L H Q T`` (PaLM, appendix B; nanoGPT's ``estimate_mfu``):
    ``N`` parameters without the position embedding, ``L`` layers, ``H`` heads of width ``Q``,
    context ``T``."""
    return 6.0 * n_params + 12.0 * n_layer * n_head * head_dim * seq_len


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense peak FLOP/s at ``precision`` from :data:`PEAK_FLOPS` (None if unknown)."""
    key = "bf16" if precision.startswith("bf16") else precision
    for name, peaks in PEAK_FLOPS.items():
        if name in device_name:
            return peaks[key]
    return None


def size_overrides(size: ModelSize, precision: str, steps: int) -> list[str]:
    """``--set`` values that turn the demo config into ``size`` at ``precision`` for ``steps`` steps."""
    return [f"model.n_layer={size.n_layer}", f"model.n_embd={size.n_embd}", f"model.n_head={size.n_head}",
            f"model.n_positions={size.seq_len}", f"data.seq_len={size.seq_len}",
            f"model.vocab_size={'null' if size.vocab_size is None else size.vocab_size}",
            f"train.micro_batch_size={size.micro_batch_size}",
            f"train.gradient_accumulation_steps={size.gradient_accumulation_steps}",
            f"deepspeed.config={PRECISIONS[precision][0]}", f"train.max_steps={steps}",
            f"train.warmup_steps={min(10, steps // 10)}", "eval.every=0", "eval.max_windows=2",
            f"eval.batch_size={size.micro_batch_size}", "checkpoint.every=0", "logging.every=10"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _param_count(cfg: Config, vocab_size: int, eot_id: int) -> int:
    """Parameters without the position embedding (tied embedding counted once), on the meta device."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(gpt2_config(cfg.model, vocab_size, eot_id))
    return sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()


def plain_loop(config: str, overrides: list[str], precision: str, out: Path) -> dict:
    """The same model, batches, AdamW, schedule and clipping as a grape-ds run, in plain PyTorch on
    one device (no DeepSpeed): the baseline ``bench throughput`` compares against. Writes
    ``{"tokens_per_sec", "peak_memory_bytes", "peak_memory_kind", "steps"}`` to ``out``."""
    cfg = load_config(config, overrides, world_size=1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = prepare_data(cfg.data)
    model = build_model(cfg.model, data.vocab_size, data.eot_id, seed=cfg.train.seed).to(device)
    t = cfg.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas),
                            eps=t.eps, **({"fused": True} if device.type == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier_fn(
        t.schedule, lr=t.lr, lr_end=t.lr_end, warmup=t.warmup_steps, total=t.max_steps, decay_rate=t.decay_rate))
    dtype = PRECISIONS[precision][1]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    clip = float(cfg.ds_config.get("gradient_clipping", 0.0))
    sampler = MixtureSampler([data.num_windows(d, "train") for d in data.domains], [1.0] * len(data.domains),
                             seed=t.seed, rank=0,
                             micro_batch_size=t.micro_batch_size, mode=cfg.mixture.batch)
    gas = t.gradient_accumulation_steps
    times, tokens_per_step = [], t.micro_batch_size * gas * cfg.data.seq_len
    devices.reset_peak_memory(device)
    model.train()
    for step in range(t.max_steps):
        for micro in range(gas):
            draw = sampler.draw(step, micro)
            rows = [data.windows(data.domains[d], "train")[w] for d, w in zip(draw.domains, draw.windows)]
            x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=x, labels=x).loss
            scaler.scale(loss / gas).backward()
        if clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss.item()  # one host sync per step, as the grape-ds loop has
        times.append(time.perf_counter())
    skip = max(5, t.max_steps // 10)
    memory, kind = devices.peak_memory_bytes(device)
    result = {"tokens_per_sec": tokens_per_step * (len(times) - skip) / (times[-1] - times[skip - 1]),
              "peak_memory_bytes": memory, "peak_memory_kind": kind, "steps": t.max_steps}
    out.write_text(json.dumps(result) + "\n")
    return result


def _run_plain(config: str, overrides: list[str], precision: str, out_dir: Path, tag: str,
               timeout_s: float = 1800) -> dict:
    out = out_dir / f"plain-{tag}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grape_ds.bench", "_plain", "--config", config, "--precision", precision,
           "--result", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"plain PyTorch loop failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(out.read_text())


def bench_throughput(config: str, model: str, precision: str, steps: int, repeats: int, periods: list[int],
                     world_size: int, peak: float | None, out: Path, overrides: list[str] = ()) -> dict:
    """Plain PyTorch, grape-ds ``static`` and grape-ds ``grape`` (a round every ``periods`` steps),
    alternating ``repeats`` times; tokens/s per device, MFU and peak memory of each, and the ratios.
    ``overrides`` apply to every run after the size's (a cache folder, say)."""
    size = MODEL_SIZES[model]
    common = [*size_overrides(size, precision, steps), f"logging.output_dir={out}", *overrides]
    cfg = load_config(config, common, world_size=world_size)
    data = prepare_data(cfg.data)  # packed once here; every run below reuses the cache
    n_params = _param_count(cfg, data.vocab_size, data.eot_id)
    fpt = flops_per_token(n_params, size.n_layer, size.n_head, size.n_embd // size.n_head, size.seq_len)
    device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
                          else "cpu")
    name = _device_name(device)
    peak = peak if peak is not None else peak_flops(name, precision)
    variants = [("plain", None), ("static", ["mixture.method=static", "mixture.every=0"])]
    variants += [(f"grape/{p}", ["mixture.method=grape", f"mixture.every={p}"]) for p in periods]
    figures: dict[str, dict[str, list]] = {v: {"tps": [], "mem": []} for v, _ in variants}
    kind = None
    for r in range(repeats):  # alternate, so drift of the machine hits every variant alike
        for variant, sets in variants:
            tag = f"{variant.replace('/', '')}-{r}"
            if sets is None:
                res = _run_plain(config, common, precision, out, tag)
                figures[variant]["tps"].append(res["tokens_per_sec"])
                mem, kind = res["peak_memory_bytes"], res["peak_memory_kind"]
            else:
                run = launch_run(config, [*common, *sets, f"logging.run_name=throughput-{tag}"], world_size,
                                 launcher=world_size > 1)
                figures[variant]["tps"].append(_throughput(run, skip=max(5, steps // 10)) / world_size)
                mem = json.loads(RunPaths(run).status.read_text())["peak_memory_bytes"]
            figures[variant]["mem"].append(mem)
    result = {"model": model, "params": n_params, "precision": precision, "device": name,
              "world_size": world_size, "seq_len": size.seq_len,
              "tokens_per_step": size.micro_batch_size * size.gradient_accumulation_steps * world_size * size.seq_len,
              "steps": steps, "repeats": repeats, "flops_per_token": fpt, "peak_flops": peak,
              "peak_memory_kind": kind}
    rows = []
    for variant, _ in variants:
        tps = float(np.median(figures[variant]["tps"]))
        mfu = tps * fpt / peak if peak else None
        mem = int(max(figures[variant]["mem"]))
        result[variant] = {"tokens_per_sec_per_device": tps, "mfu": mfu, "peak_memory_bytes": mem}
        rows.append([variant, tps, "n/a" if mfu is None else f"{100 * mfu:.1f}%", f"{mem / 2**30:.2f}",
                     " ".join(f"{v:.0f}" for v in figures[variant]["tps"])])
    static_tps = result["static"]["tokens_per_sec_per_device"]
    result["static_over_plain"] = static_tps / result["plain"]["tokens_per_sec_per_device"]
    for p in periods:
        result[f"grape{p}_over_static"] = result[f"grape/{p}"]["tokens_per_sec_per_device"] / static_tps
    print(f"{model} ({n_params / 1e6:.1f}M parameters without position embeddings), {precision}, {name}, "
          f"{world_size} device(s), {result['tokens_per_step']} tokens per step, {steps} steps")
    print(_table(["variant", "tokens/s per device", "MFU", "peak memory GiB", "runs"], rows))
    print("static / plain: " + f"{result['static_over_plain']:.3f}; "
          + "; ".join(f"grape every {p} / static: {result[f'grape{p}_over_static']:.3f}" for p in periods))
    return result


# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# Data preparation
# ----------------------------------------------------------------------------------------------

def write_text_corpus(folder: Path, n_chars: int, seed: int = 0, file_chars: int = 1 << 23) -> int:
    """Write about ``n_chars`` characters of synthetic text as JSONL files of ``file_chars`` each
    (documents of 50-400 words drawn Zipf-like from 4096 made-up words), in bounded memory.
    Returns the number of documents."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(4096)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    folder.mkdir(parents=True, exist_ok=True)
    written = docs = part = 0
    while written < n_chars:
        with open(folder / f"part-{part:05d}.jsonl", "w") as f:
            in_file = 0
            while in_file < file_chars and written < n_chars:
                text = " ".join(words[i] for i in rng.choice(len(words), size=int(rng.integers(50, 400)), p=weights))
                f.write(json.dumps({"text": text}) + "\n")
                in_file, written, docs = in_file + len(text), written + len(text), docs + 1
        part += 1
    return docs


def _run_sampling_memory(cmd: list[str], env: dict) -> tuple[str, int]:
    """Run ``cmd``; returns its output and the peak of the summed resident memory of it and every
    process below it (sampled every 50 ms)."""
    import psutil
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, chunks = 0, []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.05)
    reader.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{''.join(chunks)[-3000:]}")
    return "".join(chunks), peak


_BASELINE = """
import json, sys, time
from datasets import load_dataset
from transformers import PreTrainedTokenizerFast
files, tok_dir, num_proc, cache = json.loads(sys.argv[1])
tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
start = time.perf_counter()
ds = load_dataset("json", data_files=files, split="train", cache_dir=cache)
ids = ds.map(lambda b: {"n": [len(x) + 1 for x in tok(b["text"], add_special_tokens=False)["input_ids"]]},
             batched=True, num_proc=num_proc, remove_columns=ds.column_names)
print("BASELINE " + json.dumps({"tokens": int(sum(ids["n"])), "seconds": time.perf_counter() - start}))
"""


def bench_prepare(config: str, sizes: list[int], num_proc: int, out: Path, vocab_size: int = 8192) -> dict:
    """``grape-ds prepare`` against a plain ``datasets.map(batched=True, num_proc=N)`` tokenisation of
    the same JSONL text with the same tokenizer, at each corpus size (characters): tokens/s of both,
    their ratio, the peak resident memory of each (all processes) and the packed bytes per token.
    The tokenizer (a byte-level BPE trained on the first size's text) is named in the config, so no
    training is timed; ``config`` gives every other section. Timings start after the interpreters'
    imports."""
    from grape_ds.data.tokenizer import train_bpe
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    results = {}
    tok_dir = out / "tokenizer"
    for n_chars in sizes:
        corpus = out / f"corpus-{n_chars}"
        docs = write_text_corpus(corpus, n_chars)
        if not tok_dir.exists():
            sample = (json.loads(line)["text"] for line in open(next(iter(sorted(corpus.glob("*.jsonl"))))))
            train_bpe(sample, vocab_size).save_pretrained(str(tok_dir))
        files = sorted(str(p) for p in corpus.glob("*.jsonl"))
        cfg = out / f"prepare-{n_chars}.yaml"
        base = yaml.safe_load(Path(config).read_text())
        base["data"] = {"cache_dir": str(out / f"cache-{n_chars}"), "seq_len": 128,
                        "tokenizer": {"name": str(tok_dir)},
                        "domains": [{"name": "text", "source": {"type": "jsonl", "path": str(corpus)}}],
                        "tasks": [{"name": "held", "source": {"type": "jsonl", "path": files[0]}}]}
        cfg.write_text(yaml.safe_dump(base, sort_keys=False))
        text, ours_peak = _run_sampling_memory(
            [sys.executable, "-m", "grape_ds", "prepare", str(cfg), "--num-proc", str(num_proc)], env)
        manifest_path = next((out / f"cache-{n_chars}" / "packed").glob("[!.]*/manifest.json"))
        manifest = json.loads(manifest_path.read_text())
        seconds = float(re.search(r"\(([0-9.]+) s\)", text).group(1))
        text_tokens = manifest["units"]["text"]["tokens"]
        all_tokens = sum(u["tokens"] for u in manifest["units"].values())
        packed = sum(p.stat().st_size for p in manifest_path.parent.glob("*.bin"))
        base_out, base_peak = _run_sampling_memory(
            [sys.executable, "-c", _BASELINE, json.dumps([files, str(tok_dir), num_proc, str(out / "hf-cache")])],
            env)
        baseline = json.loads(base_out.split("BASELINE ", 1)[1].splitlines()[0])
        assert baseline["tokens"] == text_tokens, (baseline["tokens"], text_tokens)  # the same work
        ours_tps = all_tokens / seconds
        results[str(n_chars)] = {
            "chars": n_chars, "documents": docs, "tokens": text_tokens,
            "prepare_tokens_per_sec": round(ours_tps), "baseline_tokens_per_sec": round(baseline["tokens"] / baseline["seconds"]),
            "ratio": round(ours_tps / (baseline["tokens"] / baseline["seconds"]), 3),
            "prepare_peak_rss_bytes": ours_peak, "baseline_peak_rss_bytes": base_peak,
            "bytes_per_token": round(packed / sum(u["packed_tokens"] for u in manifest["units"].values()), 3)}
    return {"num_proc": num_proc, "sizes": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="grape-ds bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    o = sub.add_parser("overhead", help="tokens/s of static vs grape; round cost vs reference")
    o.add_argument("--config", default="yaml_configs/demo.yaml")
    o.add_argument("--steps", type=int, default=300)
    o.add_argument("--repeats", type=int, default=2)
    o.add_argument("--periods", type=int, nargs="+", default=[10, 100])
    o.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    f = sub.add_parser("fidelity", help="sketch vs exact estimator")
    f.add_argument("--config", default="yaml_configs/demo.yaml")
    f.add_argument("--rounds", type=int, default=50)
    f.add_argument("--steps-between", type=int, default=10)
    f.add_argument("--report", type=int, nargs="+", default=[1, 10, 20, 30, 40, 50],
                   help="rounds after which the drift is printed (and the last)")
    f.add_argument("--set", dest="overrides", action="append", default=[])
    pl = sub.add_parser("planted", help="static, doge and grape against the planted ground truth")
    pl.add_argument("--config", default="yaml_configs/demo.yaml")
    pl.add_argument("--set", dest="overrides", action="append", default=[])
    th = sub.add_parser("throughput", help="tokens/s and MFU: plain PyTorch vs grape-ds static vs grape")
    th.add_argument("--config", default="yaml_configs/demo.yaml")
    th.add_argument("--model", choices=sorted(MODEL_SIZES), default="tiny")
    th.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    th.add_argument("--steps", type=int, default=300)
    th.add_argument("--repeats", type=int, default=2)
    th.add_argument("--periods", type=int, nargs="+", default=[100, 10])
    th.add_argument("--world-size", type=int, default=1, help="ranks (devices) of the grape-ds runs")
    th.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s at this precision (default: a table of known GPUs)")
    th.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run, after the model size's")
    pr = sub.add_parser("prepare", help="grape-ds prepare vs datasets.map tokenisation: tokens/s, memory")
    pr.add_argument("--chars", type=int, nargs="+", default=[50_000_000, 200_000_000],
                    help="corpus sizes in characters (one preparation each)")
    pr.add_argument("--num-proc", type=int, default=2)
    pr.add_argument("--config", default="yaml_configs/demo.yaml", help="every section but data")
    pln = sub.add_parser("_plain", help=argparse.SUPPRESS)  # one plain-PyTorch run, for throughput
    pln.add_argument("--config", required=True)
    pln.add_argument("--precision", choices=sorted(PRECISIONS), required=True)
    pln.add_argument("--result", required=True)
    pln.add_argument("--set", dest="overrides", action="append", default=[])
    for sp in (o, pl, th, pr):
        sp.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.part == "_plain":
        plain_loop(args.config, args.overrides, args.precision, Path(args.result))
        return 0
    with tempfile.TemporaryDirectory(prefix="grape-ds-bench-") as tmp:
        out = Path(getattr(args, "out", None) or tmp)
        if args.part == "overhead":
            fig = bench_overhead(args.config, args.steps, args.repeats, args.periods, out, args.overrides)
        elif args.part == "throughput":
            peak = args.peak_tflops * 1e12 if args.peak_tflops else None
            fig = bench_throughput(args.config, args.model, args.precision, args.steps, args.repeats,
                                   args.periods, args.world_size, peak, out, args.overrides)
        elif args.part == "prepare":
            fig = bench_prepare(args.config, args.chars, args.num_proc, out)
        elif args.part == "fidelity":
            fig = bench_fidelity(args.config, args.overrides, args.rounds, args.steps_between, args.report)
        else:
            fig = bench_planted(args.config, args.overrides, out)
    print(json.dumps({"bench": args.part, **fig}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
