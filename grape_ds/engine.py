"""The DeepSpeed engine: the only module that imports ``deepspeed``.

Builds the process group (gloo on CPU, NCCL on GPUs; with a collective timeout) and records this
rank's device (:mod:`grape_ds.devices`), and wraps the model in a ZeRO engine with the client
``torch.optim.AdamW`` (fused on CUDA) and the LR schedule as a ``LambdaLR``. Gradient clipping,
accumulation, precision (fp32, bf16, fp16 with dynamic loss scaling, or torch autocast) and ZeRO
options come from the DeepSpeed JSON. :func:`precision` tells the loop what the engine does to the
forward (autocast) and to the gradients (loss scaling) that the gradient probe must know about.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from grape_ds import devices
from grape_ds.config import Config
from grape_ds.distributed import check_port_free, free_port
from grape_ds.schedules import lr_multiplier_fn

__all__ = ["init_distributed", "build_engine", "Precision", "precision", "zero_fp32_state_dict"]

log = logging.getLogger(__name__)

# DeepSpeed's ZeRO-2 calls a torch collective that torch deprecates; the warning repeats every step.
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*all_gather_into_tensor.* is deprecated")


def _no_shm_comm_op() -> None:
    """Ask DeepSpeed for no shared-memory all-reduce op.

    On the CPU accelerator ``deepspeed.init_distributed`` JIT-builds and initialises the
    ``deepspeed_shm_comm`` op (``deepspeed/comm/torch.py``: ``TorchBackend.__init__`` ->
    ``build_shm_op``), which only ``inference_all_reduce`` uses, never training. The build takes ~27 s
    on a fresh machine under a file lock that a killed build leaves behind (the next launch then waits
    in silence), and every initialised op leaves two 64 MiB ``/dev/shm/deepspeed_allreduce_buffer_*``
    files that nothing removes (325 of them, 21 GiB of RAM, after some days of test runs). grape-ds
    never calls ``inference_all_reduce``, whose fallback without the op is the process group's
    all-reduce."""
    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm's attribute `torch` is torch itself
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def init_distributed(timeout_minutes: float) -> None:
    """Start the process group from the launcher's environment (a 1-rank group when there is none).
    DeepSpeed's shared-memory inference op is neither built nor initialised (:func:`_no_shm_comm_op`)."""
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
    accelerator = get_accelerator()
    # NCCL communicates on the current device: choose it before the first collective (no-op on CPU)
    accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    _no_shm_comm_op()
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    devices.set_device(accelerator.current_device_name())


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Matrices decay; biases and LayerNorm gains do not (the usual GPT-2 recipe).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused_adamw(cfg: Config) -> bool:
    """PyTorch's fused AdamW where the optimizer runs on a CUDA device (not with the optimizer state
    offloaded to the CPU); the default (for-each on CUDA, for-loop on CPU) elsewhere."""
    offload = cfg.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return devices.current().type == "cuda" and offload in (None, "none")


def build_engine(model: torch.nn.Module, cfg: Config):
    """``deepspeed.initialize`` with AdamW and the configured LR schedule; returns the engine.

    The model should already be on :func:`grape_ds.devices.current` (the loop moves it there before
    the gradient probe hooks it)."""
    t = cfg.train
    optimizer = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=tuple(t.betas), eps=t.eps,
                                  **({"fused": True} if _fused_adamw(cfg) else {}))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier_fn(t.schedule, lr=t.lr, lr_end=t.lr_end, warmup=t.warmup_steps,
                                    total=t.max_steps, decay_rate=t.decay_rate))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=cfg.ds_config)
    return engine


@dataclass(frozen=True)
class Precision:
    """What the engine does that a side computation on ``engine.module`` must repeat or undo.

    ``autocast`` is the dtype of DeepSpeed's ``torch_autocast`` (None when off): forwards outside
    ``engine(...)`` (probe batches, evaluation) run under the same autocast. ``loss_scaling`` is true
    under fp16: ``engine.backward`` multiplies the loss by :meth:`loss_scale`, so every gradient a hook
    sees is scaled, and a step whose gradients overflowed is skipped (``engine.was_step_applied()``).
    """
    device_type: str
    autocast: torch.dtype | None
    loss_scaling: bool

    def forward_context(self):
        """The context for a forward on ``engine.module``."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast)

    def loss_scale(self, engine) -> float:
        """The factor ``engine.backward`` multiplies the loss by now: DeepSpeed's dynamic loss scale
        under fp16 (it changes between steps), 1.0 otherwise."""
        return float(engine.optimizer.loss_scale) if self.loss_scaling else 1.0


def precision(engine) -> Precision:
    """The engine's :class:`Precision`."""
    autocast = engine.torch_autocast_dtype() if engine.torch_autocast_enabled() else None
    return Precision(device_type=engine.device.type, autocast=autocast, loss_scaling=engine.fp16_enabled())


def zero_fp32_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the ZeRO checkpoint ``ckpt_dir/tag``, merged from every rank's
    partition offline (``deepspeed.utils.zero_to_fp32``: one process, no process group). DeepSpeed's
    progress lines go to stderr."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
