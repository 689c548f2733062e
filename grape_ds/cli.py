"""``grape-ds``: the command line.

    grape-ds check-config CONFIG [--set k=v ...] [--world-size N] [--data]   validate (and pre-flight) a launch
    grape-ds train --config CONFIG [...]                              one rank of a run (under a launcher)
    grape-ds ground-truth [--set k=v ...]                             the planted corpus's ground truth
    grape-ds bench {overhead,fidelity,planted} [...]                  the performance figures
    grape-ds eval RUN_DIR [--step N] [...]                            evaluate a run's checkpoint (1 process)
    grape-ds export RUN_DIR OUT_DIR [--step N] [--force]              a Hugging Face folder for lm_eval

Multi-rank runs go through the DeepSpeed launcher:
``deepspeed --num_gpus 2 --module grape_ds.train --config CONFIG``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from grape_ds.config import ConfigError, config_to_dict, load_config

__all__ = ["main"]


def _load(args: argparse.Namespace):
    """The experiment of ``args.config`` + ``--set``s, or None after printing the config error."""
    try:
        return load_config(args.config, args.overrides, world_size=args.world_size)
    except ConfigError as exc:
        print(f"grape-ds: config error: {exc}", file=sys.stderr)
        return None


def _check_config(args: argparse.Namespace) -> int:
    """Validate the config, then what a launch needs (:mod:`grape_ds.preflight`); exit 2 on a problem."""
    from grape_ds.preflight import PreflightError, preflight
    if (cfg := _load(args)) is None:
        return 2
    if args.data:
        from grape_ds.distributed import setup_logging
        setup_logging()
    try:
        notes = preflight(cfg, args.world_size, resume=not args.no_resume, data=args.data)
    except PreflightError as exc:
        print(f"grape-ds: pre-flight error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    print("# resolved DeepSpeed config:")
    print(json.dumps(cfg.ds_config, indent=2))
    for note in notes:
        print(f"# {note}", file=sys.stderr)
    print(f"# OK: {args.config} is valid for world size {args.world_size}"
          + ("" if args.data else " (data not packed: pass --data to read every record)"), file=sys.stderr)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    """Pack every unit of an experiment into the data cache ahead of training (resumable, parallel)."""
    from grape_ds.data import prepare_data
    from grape_ds.data.packing import SHARD_DOCS
    from grape_ds.distributed import setup_logging
    if (cfg := _load(args)) is None:
        return 2
    setup_logging()
    start = time.perf_counter()
    try:
        data = prepare_data(cfg.data, num_proc=args.num_proc, in_place_max_bytes=None,
                            shard_docs=args.shard_docs or SHARD_DOCS)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"grape-ds prepare: data error: {exc}", file=sys.stderr)
        return 2
    tokens = sum(e["packed_tokens"] for e in data.manifest["units"].values())
    print(f"grape-ds prepare: {data.root} holds {len(data.units)} units, {tokens} tokens in windows "
          f"({time.perf_counter() - start:.1f} s); training with the same data settings reuses it")
    return 0


def _ground_truth(args: argparse.Namespace) -> int:
    """Print the planted corpus's ground truth for ``data.planted`` keys set by ``--set``; exit 2 with the
    config error (the key named, as for an experiment's keys) on a mistake in them."""
    from dataclasses import asdict

    from grape_ds.config import PlantedConfig, section_from_overrides
    from grape_ds.data import ground_truth
    try:
        truth = ground_truth(section_from_overrides(PlantedConfig, args.overrides))
    except ConfigError as exc:
        print(f"grape-ds: config error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a corpus the generator cannot build (e.g. too many domains for its letters)
        print(f"grape-ds ground-truth: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(truth), indent=2))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _eval(args: argparse.Namespace) -> int:
    """Evaluate one checkpoint of a run in this process; a JSON line to ``<run>/eval/eval_cli.jsonl``."""
    from grape_ds.data import mc_items_for
    from grape_ds.evaluation import Evaluator, format_result
    from grape_ds.rundir import append_jsonl, load_trained_run

    run = load_trained_run(args.run_dir, args.step)
    ev = run.cfg.eval
    batch_size = args.batch_size if args.batch_size is not None else ev.batch_size
    max_windows = args.max_windows if args.max_windows is not None else ev.max_windows
    max_items = args.max_items if args.max_items is not None else ev.max_items
    mc_items = mc_items_for(run.cfg.data, max_items)
    evaluator = Evaluator(run.data, every=0, batch_size=batch_size, max_windows=max_windows, rank=0,
                          world_size=1, path=run.paths.eval_cli, mc_items=mc_items)
    result = evaluator.evaluate(run.model, run.step)
    result.update(checkpoint=run.tag, batch_size=batch_size, max_windows=max_windows, max_items=max_items,
                  time=time.time())
    path = run.paths.eval_cli
    append_jsonl(path, result)
    print(f"grape-ds eval: {run.run_dir}, checkpoint {run.tag} (step {run.step}), batch size {batch_size}, "
          f"max windows {max_windows if max_windows is not None else 'all'}")
    print(format_result(result))
    if not evaluator.mc_items:
        print("multiple-choice accuracy: skipped (no multiple-choice benchmark task in data.tasks)")
    print(f"wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Write a Hugging Face GPT-2 folder from one checkpoint of a run."""
    from grape_ds.export import export_hf

    run = export_hf(args.run_dir, args.out_dir, args.step, force=args.force)
    print(f"grape-ds export: {run.run_dir}, checkpoint {run.tag} (step {run.step}) -> {args.out_dir}")
    print(f"  lm_eval --model hf --model_args pretrained={args.out_dir} --tasks arc_easy --batch_size 16")
    return 0


def _run_command(fn, args: argparse.Namespace) -> int:
    """Run ``eval`` / ``export``; a config or run-directory problem is one line on stderr, exit 2."""
    from grape_ds.distributed import setup_logging
    from grape_ds.rundir import RunDirError

    setup_logging()
    try:
        return fn(args)
    except (ConfigError, RunDirError) as exc:
        print(f"grape-ds {args.command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="grape-ds", description="Online multi-target data-mixture "
                                "optimisation (GRAPE) on DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check-config", help="validate a config without running it")
    c.add_argument("config")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--world-size", type=_positive_int, default=1, help="ranks the run will have (batch arithmetic)")
    c.add_argument("--data", action="store_true",
                   help="also pack the data (reads every record; the run then reuses the packed folder)")
    c.add_argument("--no-resume", action="store_true", help="the launch starts over (no resume check)")
    c.add_argument("--stop-at", type=int, default=None, help=argparse.SUPPRESS)  # a train argument, ignored
    r = sub.add_parser("prepare", help="pack every domain and task of an experiment into the data cache "
                       "ahead of training (parallel, resumable; returns at once when already prepared)")
    r.add_argument("config")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--num-proc", type=_positive_int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="tokenising processes (default: the CPUs, at most 8)")
    r.add_argument("--shard-docs", type=_positive_int, default=None,
                   help="documents per shard, the unit of parallel work and of resuming (default 4096)")
    r.add_argument("--world-size", type=_positive_int, default=1,
                   help="only for the config's batch arithmetic; the packed data does not depend on it")
    t = sub.add_parser("train", help="one rank of a training run (use under the deepspeed launcher)",
                       add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="benchmarks: overhead, fidelity, planted", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    g = sub.add_parser("ground-truth", help="print the planted corpus's ground truth")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a data.planted key, e.g. num_domains=9")
    e = sub.add_parser("eval", help="evaluate a run's checkpoint in one process (loss sweep, "
                       "multiple-choice accuracy); appends to <run>/eval/eval_cli.jsonl")
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    e.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest complete)")
    e.add_argument("--batch-size", type=_positive_int, default=None, help="sequences per forward (default: eval.batch_size)")
    e.add_argument("--max-windows", type=_positive_int, default=None,
                   help="validation windows swept per unit (default: eval.max_windows)")
    e.add_argument("--max-items", type=_positive_int, default=None,
                   help="multiple-choice items per benchmark task (default: eval.max_items)")
    x = sub.add_parser("export", help="write a Hugging Face GPT-2 folder (model + tokenizer) from a "
                       "run's checkpoint, e.g. for lm_eval")
    x.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    x.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    x.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest complete)")
    x.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    args = p.parse_args(argv)
    if args.command == "eval":
        return _run_command(_eval, args)
    if args.command == "export":
        return _run_command(_export, args)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "train":
        from grape_ds.train import main as train_main
        return train_main(args.rest)
    if args.command == "bench":
        from grape_ds.bench import main as bench_main
        return bench_main(args.rest)
    return _ground_truth(args)


if __name__ == "__main__":
    sys.exit(main())
