"""The prepared GPU check: grape-ds on one GPU (NCCL), or its logic on the CPU (``--cpu``, gloo).

Run through ``scripts/gpu_check.sh`` (which installs carried wheels and sets the environment). Each
part below is timed and recorded in ``<out>/gpu_check.json`` whether it passes or not, so one try on a
lent machine returns everything it learned; the exit status is 0 only if every check held.

1. ``environment``: PyTorch, CUDA device, DeepSpeed and transformers versions.
2. ``full``: a GRAPE run with the demo's reweighting settings (a round every ``E`` steps, in-band
   domain gradients over the last 2 steps, 4 probe sequences per task) on GPT-2 124M in bf16 under
   ZeRO-2 (``--cpu``: the demo's tiny model), dropout 0.1 and deterministic kernels, ``4 E`` steps.
3. ``exact_resume``: the same run stopped after step ``2 E`` (a round boundary), resumed and stopped
   again after ``3 E - 1`` (inside an in-band window), then resumed to the end: losses, the weight
   history, the averaged weights and the final parameters equal to ``full``'s.
4. ``frozen_probe``: ``static`` against ``grape`` with both step sizes 0: equal parameters and losses
   (the probe's forwards, with dropout, change nothing in training: RNG isolation on the device).
5. ``throughput``: ``grape-ds bench throughput`` for the model and precision (plain PyTorch, static,
   grape every 100 and every 10 steps; ``--cpu``: a short tiny run, grape every 3 steps).

The test suite runs it with ``--cpu --ranks 2`` (tests/test_gpu_check.py): the frozen-probe and
exact-resume guarantees are asserted there, on 2 gloo ranks, by the same code that checks them on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grape_ds.bench import MODEL_SIZES, bench_throughput, launch_run, size_overrides  # noqa: E402

DEMO = str(REPO / "yaml_configs" / "demo.yaml")


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def _mixture(run: Path) -> dict:
    return json.loads((run / "mixture.json").read_text())


def _params(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = run / "checkpoints"
    tag = sorted(p.name for p in ckpt.iterdir() if (p / "COMPLETE").exists())[-1]
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)


def _max_param_diff(a: Path, b: Path) -> float:
    pa, pb = _params(a), _params(b)
    if pa.keys() != pb.keys():
        return float("inf")
    return max(float((pa[k].float() - pb[k].float()).abs().max()) for k in pa)


def _loss_diff(a: Path, b: Path, steps) -> float:
    la, lb = _losses(a), _losses(b)
    return max(abs(la[s] - lb[s]) for s in steps)


class Check:
    """Runs the parts in order; each records ``ok``, its figures or error, and its seconds."""

    def __init__(self, out: Path) -> None:
        self.out, self.parts = out, {}
        out.mkdir(parents=True, exist_ok=True)

    def part(self, name: str, fn) -> dict | None:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            result = {"ok": True, **fn()}
            if "equal" in result:
                result["ok"] = bool(result["equal"])
        except Exception as exc:  # record and go on: one try on a lent machine must return everything
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-3000:],
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - t, 1)
        self.parts[name] = result
        print(json.dumps({name: {k: v for k, v in result.items() if k != "traceback"}}), flush=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.parts, indent=2) + "\n")
        return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny model on the CPU accelerator (gloo)")
    p.add_argument("--out", default="runs/gpu_check", help="gpu_check.json goes here")
    p.add_argument("--runs", default=None, help="the training runs go here (default: OUT/runs); checkpoints "
                   "of a 124M model are GBs, keep them out of a folder that is copied back")
    p.add_argument("--every", type=int, default=None, help="steps between rounds (default: 10 GPU, 3 CPU)")
    p.add_argument("--bench-steps", type=int, default=None, help="steps per throughput run (default: 200 GPU, 12 CPU)")
    p.add_argument("--bench-repeats", type=int, default=1)
    p.add_argument("--ranks", type=int, default=1, help="ranks of the training runs (devices on a GPU machine)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (for example data.cache_dir=...)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    # on a CPU without native bf16 (no AVX512-BF16/AMX: torch emulates it, several times slower) the
    # check's logic runs in fp32; on a GPU, and on a CPU that has it, in bf16
    native_bf16 = not args.cpu or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    model, precision = ("tiny" if args.cpu else "124m"), ("bf16" if native_bf16 else "fp32")
    every = args.every or (3 if args.cpu else 10)
    bench_steps = args.bench_steps or (12 if args.cpu else 200)
    steps, stop = 4 * every, 3 * every - 1
    check = Check(out)

    def environment() -> dict:
        import deepspeed
        import transformers
        cuda = torch.cuda.is_available() and not args.cpu
        return {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                "model": model, "precision": precision}

    check.part("environment", environment)
    runs = Path(args.runs).resolve() if args.runs else out / "runs"
    base = [*size_overrides(MODEL_SIZES[model], precision, steps), f"logging.output_dir={runs}",
            "model.dropout=0.1", "train.deterministic=true", "logging.trace_batches=false", *args.overrides]
    ranks = args.ranks
    grape = ["mixture.method=grape", f"mixture.every={every}"]

    def full() -> dict:
        run = launch_run(DEMO, [*base, *grape, "logging.run_name=full"], world_size=ranks)
        mix, losses = _mixture(run), _losses(run)
        status = json.loads((run / "status.json").read_text())
        return {"rounds": mix["rounds"], "skipped_rounds": mix["skipped_rounds"], "alpha": mix["alpha"],
                "z": mix["z"], "first_loss": losses[1], "last_loss": losses[steps],
                "peak_memory_bytes": status["peak_memory_bytes"],
                "equal": mix["rounds"] == steps // every and mix["skipped_rounds"] == 0}

    def exact_resume() -> dict:
        split = [*base, *grape, "logging.run_name=split"]
        stopped = []
        for at in (2 * every, stop):
            run = launch_run(DEMO, split, world_size=ranks, args=("--stop-at", str(at)), fresh=not stopped)
            stopped.append(json.loads((run / "status.json").read_text())["step"])
        run = launch_run(DEMO, split, world_size=ranks, fresh=False)
        ref = runs / "full"
        loss_diff = _loss_diff(ref, run, range(1, steps + 1))
        param_diff = _max_param_diff(ref, run)
        a, b = _mixture(ref), _mixture(run)
        same_weights = a["history"] == b["history"] and a["alpha_avg"] == b["alpha_avg"]
        return {"stopped_at": stopped, "max_loss_diff": loss_diff, "max_param_diff": param_diff,
                "same_weight_history": same_weights, "steps": sorted(_losses(run)) == list(range(1, steps + 1)),
                "equal": loss_diff == 0 and param_diff == 0 and same_weights and stopped == [2 * every, stop]}

    def frozen_probe() -> dict:
        launch_run(DEMO, [*base, "mixture.method=static", "logging.run_name=static"], world_size=ranks)
        launch_run(DEMO, [*base, *grape, "mixture.mu_domain=0", "mixture.mu_task=0",
                          "logging.run_name=frozen"], world_size=ranks)
        loss_diff = _loss_diff(runs / "static", runs / "frozen", range(1, steps + 1))
        param_diff = _max_param_diff(runs / "static", runs / "frozen")
        return {"rounds": _mixture(runs / "frozen")["rounds"], "max_loss_diff": loss_diff,
                "max_param_diff": param_diff, "equal": loss_diff == 0 and param_diff == 0}

    def throughput() -> dict:
        periods = [3] if args.cpu else [100, 10]  # CPU: the command's logic, not figures
        return bench_throughput(DEMO, model, precision, bench_steps, args.bench_repeats, periods,
                                world_size=1, peak=None, out=runs / "bench", overrides=args.overrides)

    check.part("full", full)
    check.part("exact_resume", exact_resume)
    check.part("frozen_probe", frozen_probe)
    check.part("throughput", throughput)
    ok = all(part["ok"] for part in check.parts.values())
    print(f"gpu_check: {'all checks held' if ok else 'SOME CHECKS FAILED'}; results in {out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
