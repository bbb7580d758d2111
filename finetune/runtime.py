"""Where code runs: device choice and the torch.distributed context (rank, world size, barrier).

Nothing here assumes CUDA exists. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set)
:func:`init_distributed` starts the process group with ``nccl`` on CUDA and
``gloo`` on CPU.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["resolve_device", "is_distributed", "rank", "world_size", "is_main", "barrier",
           "init_distributed", "set_determinism", "all_reduce_sum"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> ``cuda`` (this rank's GPU under torchrun) when available, else ``cpu``.

    ``cuda`` or ``cuda:i`` without a GPU is an error that says so.
    """
    if isinstance(device, torch.device):
        return device
    device = (device or "auto").strip().lower()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but this machine has no usable CUDA GPU; "
                             "use --device cpu or --device auto")
        d = torch.device(device)
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) present")
        return d
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place, returned); a no-op in a single process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def init_distributed(device: str = "auto") -> torch.device:
    """Start the process group when launched by torchrun; return this rank's device."""
    dev = resolve_device(device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return dev


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy and torch; deterministic algorithms where cheap. TF32 off for numerics."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False


@contextmanager
def no_tf32():
    """Analysis numerics: TF32 off inside, restored after."""
    if not torch.cuda.is_available():
        yield
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
