"""``grape-ds bench``: the figures behind the README's performance section.

Three parts; each prints a table and, as its last line, one JSON object with its figures.

* ``overhead``: the same config trained with ``static`` and with ``grape`` (a round every 10 and every
  100 steps), 2 ranks under the ``deepspeed`` launcher, alternating in one invocation; tokens/s of
  each and the ratios grape/static. Then, in one process, the cost of our round against a
  reference-style round (probe batches for every domain and task plus the mixture batches, full
  flattened gradients), and the probe's memory.
* ``fidelity``: on a small GPT-2, the sketch against the exact estimator on the same batches: the
  relative Frobenius error of the Gram matrix, and the largest difference of alpha and z after 10
  rounds driven by each.
* ``planted``: ``static``, ``doge`` and ``grape`` on the planted corpus (2 ranks); each run's final
  alpha and z next to the corpus's ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from grape_ds.config import Config, load_config
from grape_ds.controller import MixtureController, RoundStats
from grape_ds.data import ground_truth, prepare_data
from grape_ds.data.sampler import probe_windows
from grape_ds.distributed import free_port
from grape_ds.model import build_model
from grape_ds.probe import GradientProbe

__all__ = ["main", "launch_run"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def launch_run(config: str, overrides: list[str], world_size: int = 2, timeout_s: float = 1800) -> Path:
    """Train ``config`` with ``world_size`` ranks under the deepspeed launcher; returns the run dir.
    A run that outlives ``timeout_s`` is killed (with its ranks) and reported, never waited on forever."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world_size),
           "--master_port", str(free_port()), "--module", "grape_ds.train", "--config", config,
           "--no-resume"]
    for o in ["logging.progress=false", *overrides]:
        cmd += ["--set", o]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
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
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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
    w = data.windows(name, "train")
    return torch.from_numpy(np.stack([w[i] for i in windows]).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# overhead
# ----------------------------------------------------------------------------------------------

def _round_costs(cfg: Config, repeats: int = 5) -> dict:
    """Seconds per round, ours vs reference-style, on one process with the config's model."""
    _single_process_env()
    torch.set_num_threads(1)
    data = prepare_data(cfg.data)
    model = build_model(cfg.model, data.vocab_size, data.eot_id, seed=cfg.train.seed)
    units = data.domains + data.tasks
    k = len(data.domains)
    probe = GradientProbe(model, len(units), cfg.probe.estimator, cfg.probe.dim, cfg.probe.seed)
    params = probe.params
    b, mb, b_r, tau = cfg.probe.batch_size, cfg.train.micro_batch_size, 2, cfg.mixture.unit_clip or 1.0
    ctl = MixtureController("grape", data.domains, data.tasks)

    def ours(step):
        for n, t in enumerate(data.tasks):  # domains come in-band from training micro-batches
            x = _unit_batch(data, cfg, t, k + n, step, b)
            loss = model(input_ids=x, labels=x).loss
            with probe.unit(k + n):
                torch.autograd.grad(loss, params)
            probe.record(k + n, loss.item(), b)
        proj, losses, seqs = probe.reduce()
        ctl.round(step, RoundStats(losses.double().numpy(), probe.gram(proj).numpy(), seqs.numpy(), k))

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


def bench_overhead(config: str, steps: int, repeats: int, periods: list[int], out: Path) -> dict:
    variants = [("static", ["mixture.method=static", "mixture.every=0"])]
    variants += [(f"grape/{p}", ["mixture.method=grape", f"mixture.every={p}"]) for p in periods]
    common = [f"train.max_steps={steps}", "eval.every=0", "eval.max_windows=8", "checkpoint.every=0",
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
    costs = _round_costs(load_config(config, [f"logging.output_dir={out}"], world_size=2))
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

def bench_fidelity(config: str, overrides: list[str], rounds: int, steps_between: int, batch: int) -> dict:
    """Sketch vs exact on the same batches; the model trains between rounds on a uniform mixture."""
    _single_process_env()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(config, ["mixture.method=grape", *overrides], world_size=1)
    data = prepare_data(cfg.data)
    model = build_model(cfg.model, data.vocab_size, data.eot_id, seed=cfg.train.seed)
    units = data.domains + data.tasks
    k = len(data.domains)
    exact = GradientProbe(model, len(units), "exact")
    sketch = GradientProbe(model, len(units), "sketch", cfg.probe.dim, cfg.probe.seed)
    from grape_ds.train import _method_params  # the same method parameters a run uses
    ctl = {name: MixtureController("grape", data.domains, data.tasks, cfg.mixture.weights,
                                   cfg.mixture.task_weights, _method_params(cfg)) for name in ("exact", "sketch")}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    rng = np.random.default_rng(cfg.train.seed)
    errors, rows = [], []
    for r in range(rounds):
        for u, name in enumerate(units):
            x = _unit_batch(data, cfg, name, u, r, batch)
            loss = model(input_ids=x, labels=x).loss
            with exact.unit(u), sketch.unit(u):
                torch.autograd.grad(loss, exact.params)
            exact.record(u, loss.item(), batch)
            sketch.record(u, loss.item(), batch)
        pe, le, se = exact.reduce()
        ps, ls, ss = sketch.reduce()
        ge, gs = exact.gram(pe), sketch.gram(ps)
        err = ((ge - gs).norm() / ge.norm()).item()
        errors.append(err)
        ctl["exact"].round(r + 1, RoundStats(le.double().numpy(), ge.numpy(), se.numpy(), k))
        ctl["sketch"].round(r + 1, RoundStats(ls.double().numpy(), gs.numpy(), ss.numpy(), k))
        da = np.abs(ctl["exact"].alpha - ctl["sketch"].alpha).max()
        dz = np.abs(ctl["exact"].z - ctl["sketch"].z).max()
        rows.append([r + 1, err, float(da), float(dz)])
        for _ in range(steps_between):  # move the model so every round sees new gradients
            d = data.domains[rng.integers(k)]
            w = data.windows(d, "train")
            x = torch.from_numpy(np.stack([w[i] for i in rng.integers(len(w), size=cfg.train.micro_batch_size)]).astype(np.int64))
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    print(_table(["round", "Gram rel. Frobenius error", "max |d alpha|", "max |d z|"], rows))
    return {"sketch_dim": cfg.probe.dim, "rounds": rounds, "gram_rel_error_mean": float(np.mean(errors)),
            "gram_rel_error_max": float(np.max(errors)), "alpha_max_abs_diff": rows[-1][2],
            "z_max_abs_diff": rows[-1][3], "alpha_exact": ctl["exact"].alpha.tolist(),
            "alpha_sketch": ctl["sketch"].alpha.tolist()}


# ----------------------------------------------------------------------------------------------
# planted
# ----------------------------------------------------------------------------------------------

def planted_figures(mixture: dict, truth) -> dict:
    """The relevant domains' total weight over their uniform share, and the top task."""
    alpha = np.asarray(mixture["alpha"])
    idx = [mixture["domains"].index(d) for d in truth.relevant_domains]
    share = float(alpha[idx].sum())
    uniform = len(idx) / len(alpha)
    top = mixture["tasks"][int(np.argmax(mixture["z"]))]
    return {"relevant_share": share, "relevant_over_uniform": share / uniform, "top_task": top,
            "top_task_is_hard": top == truth.hard_task, "alpha": mixture["alpha"], "z": mixture["z"]}


def bench_planted(config: str, overrides: list[str], out: Path) -> dict:
    cfg = load_config(config, overrides, world_size=2)
    truth = ground_truth(cfg.data.planted)
    fig, rows = {"relevant_domains": list(truth.relevant_domains), "hard_task": truth.hard_task}, []
    for method in ("static", "doge", "grape"):
        sets = [*overrides, f"mixture.method={method}", f"logging.output_dir={out}", f"logging.run_name=planted-{method}"]
        if method == "static":
            sets.append("mixture.every=0")
        run = launch_run(config, sets)
        f = planted_figures(json.loads((run / "mixture.json").read_text()), truth)
        fig[method] = f
        rows.append([method, f["relevant_share"], f["relevant_over_uniform"], f["top_task"],
                     " ".join(f"{a:.3f}" for a in f["alpha"]), " ".join(f"{v:.3f}" for v in f["z"])])
    print(f"ground truth: relevant domains {list(truth.relevant_domains)} (uniform share "
          f"{len(truth.relevant_domains) / len(cfg.domain_names):.3f}), hard task {truth.hard_task}")
    print(_table(["method", "relevant share", "x uniform", "top task", "alpha", "z"], rows))
    return fig


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="grape-ds bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    o = sub.add_parser("overhead", help="tokens/s of static vs grape; round cost vs reference")
    o.add_argument("--config", default="yaml_configs/demo.yaml")
    o.add_argument("--steps", type=int, default=300)
    o.add_argument("--repeats", type=int, default=2)
    o.add_argument("--periods", type=int, nargs="+", default=[10, 100])
    f = sub.add_parser("fidelity", help="sketch vs exact estimator")
    f.add_argument("--config", default="yaml_configs/demo.yaml")
    f.add_argument("--rounds", type=int, default=10)
    f.add_argument("--steps-between", type=int, default=10)
    f.add_argument("--batch", type=int, default=8)
    f.add_argument("--set", dest="overrides", action="append", default=[])
    pl = sub.add_parser("planted", help="static, doge and grape against the planted ground truth")
    pl.add_argument("--config", default="yaml_configs/demo.yaml")
    pl.add_argument("--set", dest="overrides", action="append", default=[])
    for sp in (o, pl):
        sp.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="grape-ds-bench-") as tmp:
        out = Path(getattr(args, "out", None) or tmp)
        if args.part == "overhead":
            fig = bench_overhead(args.config, args.steps, args.repeats, args.periods, out)
        elif args.part == "fidelity":
            fig = bench_fidelity(args.config, args.overrides, args.rounds, args.steps_between, args.batch)
        else:
            fig = bench_planted(args.config, args.overrides, out)
    print(json.dumps({"bench": args.part, **fig}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
