"""Device discipline: where grape-ds tensors live, one rule for the whole package.

The rule (README, "Device discipline"):

1. **One device.** It is the engine's: DeepSpeed's accelerator device for this rank (``cuda:<local
   rank>`` with NCCL on GPUs, ``cpu`` with gloo here). :func:`grape_ds.engine.init_distributed`
   records it once with :func:`set_device`; everything else asks :func:`current` or the module's
   parameters (``next(model.parameters()).device``, the same device after ``deepspeed.initialize``).
2. **Tensors that meet a gradient or enter a collective live there.** Every tensor grape-ds creates
   names its device (``device=``); host data (numpy arrays, Python numbers) moves there before it
   meets device tensors. NCCL refuses a CPU tensor, so a CPU-only habit is a GPU crash.
   :func:`check_collective` enforces this for every collective in :mod:`grape_ds.distributed`.
3. **Values leave for the host only where they leave torch**: the numpy controller, JSON files and
   TensorBoard, after the reduction (one ``.item()`` / ``.cpu()`` per result, not per micro-batch).
4. **Randomness is training's own, on every device.** Training's generators are seeded per rank
   (:func:`seed_training_rng`) and checkpointed per rank (:func:`rng_state`); side computations
   draw from forked generators (:func:`isolated_rng`), so the gradient probe's forwards never change
   training's dropout masks and a resumed run draws the masks an uninterrupted one would.

Checking the rule on a CPU-only machine: :class:`DeviceCheck` sends every tensor that grape-ds code
creates *without naming a device* to PyTorch's ``meta`` device, so a forgotten ``device=`` fails on
the CPU at its first use (a collective, a copy to the device, ``.item()``) where it would fail on a
GPU; with ``mixing`` it also raises on any operation whose tensors live on two devices
(``reference/GPU_DEVICE.md``: PyTorch itself lets ``cpu_tensor.add_(meta_tensor)`` pass). For a whole
run, ``GRAPE_DS_CHECK_DEVICES=1`` turns on the first (nearly free; the test suite runs every launch
with it) and ``GRAPE_DS_CHECK_DEVICES=strict`` both (about 25% slower on the demo model).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["set_device", "current", "check_collective", "isolated_rng", "peak_memory_bytes",
           "reset_peak_memory", "use_deterministic_algorithms", "seed_training_rng", "rng_state",
           "set_rng_state", "TrainingRNG", "DeviceCheck", "DeviceMixError", "CHECK_ENV", "check_from_env"]

CHECK_ENV = "GRAPE_DS_CHECK_DEVICES"

_device = torch.device("cpu")


def set_device(device: torch.device | str) -> None:
    """Record this process's device (called once, when the process group starts)."""
    global _device
    _device = torch.device(device)


def current() -> torch.device:
    """This process's device: the engine's (``cpu`` until :func:`set_device` is called)."""
    return _device


def _same(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device when the current CUDA device is 0
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_collective(tensor: torch.Tensor, what: str = "collective") -> None:
    """Raise unless ``tensor`` lives on this process's device (NCCL takes only CUDA tensors).

    Raises:
        RuntimeError: naming the tensor's device, the expected one, and the fix.
    """
    if not _same(tensor.device, _device):
        raise RuntimeError(f"{what} on a tensor on {tensor.device}, but this process communicates on "
                           f"{_device}: create it with device=grape_ds.devices.current() (or move it "
                           "there) before the collective")


@contextmanager
def isolated_rng(device: torch.device | str):
    """Within the block, random draws (dropout masks) come from forked generators: the CPU's and
    ``device``'s. On leaving, every generator is back where it was, so training draws exactly what it
    would have drawn without the block (the frozen-probe guarantee, on CPU and on GPU)."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        with torch.random.fork_rng(devices=[]):
            yield
        return
    module = getattr(torch, device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        yield


def seed_training_rng(seed: int, rank: int) -> None:
    """Seed the generators training draws from (dropout): the CPU's and every accelerator's, with a
    stream per rank (``seed + rank``, as nanoGPT offsets its seed by rank). Without it, the stream
    depends on what happened in the process before (libraries seed PyTorch at random on import)."""
    torch.manual_seed(seed + rank)  # seeds the CPU and every CUDA device


def rng_state(device: torch.device | str) -> dict:
    """The generators' states (CPU and ``device``'s), for a checkpoint: resuming restores them, so a
    run with dropout continues with exactly the masks an uninterrupted run would draw."""
    device = torch.device(device)
    state = {"cpu": torch.get_rng_state()}
    if device.type not in ("cpu", "meta"):
        module = getattr(torch, device.type)
        state[device.type] = module.get_rng_state(device.index if device.index is not None else module.current_device())
    return state


def set_rng_state(state: dict, device: torch.device | str) -> None:
    """Restore what :func:`rng_state` saved (a state of another device type is ignored)."""
    device = torch.device(device)
    torch.set_rng_state(state["cpu"])
    if device.type not in ("cpu", "meta") and device.type in state:
        module = getattr(torch, device.type)
        module.set_rng_state(state[device.type], device.index if device.index is not None else module.current_device())


class TrainingRNG:
    """The training generators of this rank as a checkpointable part (:func:`rng_state` /
    :func:`set_rng_state` on ``device``), for :class:`grape_ds.checkpoint.Checkpointer`."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)

    def state_dict(self) -> dict:
        return rng_state(self.device)

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state, self.device)


def use_deterministic_algorithms() -> None:
    """Deterministic kernels from here on: ``torch.use_deterministic_algorithms(True)`` (an operation
    without a deterministic kernel raises, naming itself), cuDNN without autotuning, and the cuBLAS
    workspace setting PyTorch requires for deterministic matrix products (set before the first CUDA
    matrix product, so call this before the model runs). CPU kernels are deterministic already."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def reset_peak_memory(device: torch.device | str) -> None:
    """Start the device's peak-memory counter afresh (CUDA; the host's peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device | str) -> tuple[int, str]:
    """``(bytes, kind)``: the most memory this process has held on ``device``. On CUDA, PyTorch's
    allocated peak (``"cuda_max_allocated"``); on the CPU, the process's peak resident set
    (``"cpu_max_rss"``, which includes Python and every library)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"


# ----------------------------------------------------------------------------------------------
# Checking the rule on a CPU-only machine
# ----------------------------------------------------------------------------------------------

class DeviceMixError(RuntimeError):
    """An operation met tensors on two devices (a CPU-made tensor meeting a device gradient)."""


def check_from_env():
    """The :class:`DeviceCheck` that ``GRAPE_DS_CHECK_DEVICES`` asks for (``1``: unnamed devices;
    ``strict``: also mixing), or a context that does nothing (unset, ``0``).

    Raises:
        ValueError: any other value.
    """
    value = os.environ.get(CHECK_ENV, "").strip().lower()
    if value in ("", "0"):
        return contextlib.nullcontext()
    if value not in ("1", "strict"):
        raise ValueError(f"{CHECK_ENV}={value!r}: use 1 (tensors made without a device go to meta), "
                         "strict (also refuse operations that mix devices) or 0")
    return DeviceCheck(mixing=value == "strict")


def _factories() -> set:
    from torch.utils._device import _device_constructors
    return set(_device_constructors())


_TRANSFERS = {"aten._to_copy.default", "aten.copy_.default", "aten._copy_from.default",
              "aten._copy_from_and_resize.default", "aten.lift_fresh.default", "aten.set_.source_Storage",
              "aten.set_.source_Storage_storage_offset", "aten.set_.source_Tensor"}


class _UnnamedDeviceToMeta(TorchFunctionMode):
    """Factory calls (``torch.zeros``, ``torch.tensor``, ...) made by code under ``root`` (a folder)
    without a ``device=`` create their tensor on ``meta``. Code is matched by its file, so a module
    run as ``__main__`` (``python -m grape_ds.train``) counts too."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root, self.factories = os.path.join(os.path.abspath(root), ""), _factories()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.factories and kwargs.get("device") is None:
            if os.path.abspath(sys._getframe(1).f_code.co_filename).startswith(self.root):
                kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


class _NoDeviceMixing(TorchDispatchMode):
    """Raise :class:`DeviceMixError` on any operation whose tensors live on more than one device
    (0-dim CPU tensors excepted, as CUDA allows them; explicit transfers excepted)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in _TRANSFERS:
            flat, _ = tree_flatten((args, kwargs or {}))
            devices = {str(t.device) for t in flat if isinstance(t, torch.Tensor)
                       and not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                raise DeviceMixError(f"{func}: tensors on {sorted(devices)}")
        return func(*args, **(kwargs or {}))


class DeviceCheck:
    """Context manager: tensors that code under ``root`` (default: the grape_ds package's folder)
    creates without naming a device go to ``meta``; with ``mixing``, operations that mix devices raise
    :class:`DeviceMixError`. For tests and ``GRAPE_DS_CHECK_DEVICES`` runs on the CPU, never for
    speed. Thread-local, like PyTorch's modes."""

    def __init__(self, root: str | None = None, mixing: bool = True) -> None:
        root = root if root is not None else os.path.dirname(os.path.abspath(__file__))
        self.modes = [_UnnamedDeviceToMeta(root)] + ([_NoDeviceMixing()] if mixing else [])

    def __enter__(self) -> "DeviceCheck":
        for m in self.modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self.modes):
            m.__exit__(*exc)
