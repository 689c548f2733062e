"""``grape-ds``: the command line.

    grape-ds check-config CONFIG [--set k=v ...] [--world-size N]   validate and print the resolved config
    grape-ds train --config CONFIG [...]                              one rank of a run (under a launcher)
    grape-ds ground-truth [--set k=v ...]                             the planted corpus's ground truth
    grape-ds bench {overhead,fidelity,planted} [...]                  the performance figures

Multi-rank runs go through the DeepSpeed launcher:
``deepspeed --num_gpus 2 --module grape_ds.train --config CONFIG``.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from grape_ds.config import ConfigError, config_to_dict, load_config

__all__ = ["main"]


def _check_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides, world_size=args.world_size)
    except ConfigError as exc:
        print(f"grape-ds: config error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    print("# resolved DeepSpeed config:")
    print(json.dumps(cfg.ds_config, indent=2))
    print(f"# OK: {args.config} is valid for world size {args.world_size}", file=sys.stderr)
    return 0


def _ground_truth(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from grape_ds.config import PlantedConfig
    from grape_ds.data import ground_truth
    cfg = PlantedConfig()
    raw = asdict(cfg)
    for item in args.overrides:
        key, value = item.split("=", 1)
        raw[key] = yaml.safe_load(value)
    print(json.dumps(asdict(ground_truth(PlantedConfig(**raw))), indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="grape-ds", description="Online multi-target data-mixture "
                                "optimisation (GRAPE) on DeepSpeed.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check-config", help="validate a config without running it")
    c.add_argument("config")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--world-size", type=int, default=1, help="ranks the run will have (batch arithmetic)")
    t = sub.add_parser("train", help="one rank of a training run (use under the deepspeed launcher)",
                       add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="benchmarks: overhead, fidelity, planted", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    g = sub.add_parser("ground-truth", help="print the planted corpus's ground truth")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a data.planted key, e.g. num_domains=9")
    args = p.parse_args(argv)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "train":
        from grape_ds.train import main as train_main
        return train_main(args.rest)
    if args.command == "bench":
        from grape_ds.bench import main as bench_main
        return bench_main(args.rest)
    return _ground_truth(args)


if __name__ == "__main__":
    sys.exit(main())
