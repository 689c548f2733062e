"""The DeepSpeed engine: the only module that imports ``deepspeed``.

Builds the process group (gloo on CPU, NCCL on GPUs; with a collective timeout), and wraps the model
in a ZeRO engine with the client ``torch.optim.AdamW`` and the LR schedule as a ``LambdaLR``.
Gradient clipping, accumulation, precision and ZeRO options come from the DeepSpeed JSON.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings

import deepspeed
import torch

from grape_ds.config import Config
from grape_ds.distributed import check_port_free, free_port
from grape_ds.schedules import lr_multiplier_fn

__all__ = ["init_distributed", "build_engine"]

log = logging.getLogger(__name__)

# DeepSpeed's ZeRO-2 calls a torch collective that torch deprecates; the warning repeats every step.
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*all_gather_into_tensor.* is deprecated")


def init_distributed(timeout_minutes: float) -> None:
    """Start the process group from the launcher's environment (a 1-rank group when there is none)."""
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: launch with `deepspeed` or "
                               "set MASTER_ADDR/MASTER_PORT for every rank")
        os.environ["MASTER_PORT"] = str(free_port())  # a single-process run
    elif os.environ["RANK"] == "0" and "TORCHELASTIC_RUN_ID" not in os.environ:
        # rank 0 will listen on MASTER_PORT: a taken port would otherwise leave the other ranks
        # waiting for it until the timeout
        check_port_free(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                        "pass another --master_port to the launcher (or set MASTER_PORT)")
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Matrices decay; biases and LayerNorm gains do not (the usual GPT-2 recipe).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, cfg: Config):
    """``deepspeed.initialize`` with AdamW and the configured LR schedule; returns the engine."""
    t = cfg.train
    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=tuple(t.betas), eps=t.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier_fn(t.schedule, lr=t.lr, lr_end=t.lr_end, warmup=t.warmup_steps,
                                    total=t.max_steps, decay_rate=t.decay_rate))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=cfg.ds_config)
    return engine
