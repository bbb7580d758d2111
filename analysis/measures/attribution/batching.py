"""Batching and randomness of the attribution passes: how many images go through one forward/backward pass
(``eval_batch``, from the model's activation memory, halved on an out-of-memory error), and the seeded random
state of each chunk (the same draws for every model of a group, the caller's generators untouched)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from tunelens.core.models import model_device

__all__ = ["auto_eval_batch", "chunk_seed", "is_oom", "seeded"]

_CPU_MAX_BATCH = 256
_GPU_MAX_BATCH = 2048


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """torch (CPU and ``device``) and NumPy global generators seeded inside; the caller's states restored after."""
    devices = [device] if device is not None and device.type == "cuda" else []
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        try:
            yield
        finally:
            np.random.set_state(np_state)


def chunk_seed(seed: int, start: int) -> int:
    """The seed of the chunk that starts at image ``start`` (a hash of ``seed`` and ``start``): the same draws for
    every model of a group, whatever the chunk size."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(start)]).generate_state(1)[0])


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (CUDA, or the CPU allocator's)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    )


def _available_ram() -> int:
    """Bytes of RAM a new allocation can have: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus the page
    cache the kernel gives back), not free memory alone (``SC_AVPHYS_PAGES``), which the page cache of any
    earlier file reads shrinks: with it, a resnet50 study at 224 px on a machine with 21 GB available but 5 GB
    free ran its attribution passes 3 images at a time instead of 14, and at 1 when less was free."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@torch.no_grad()
def _activation_bytes(model: nn.Module, x1: torch.Tensor) -> int:
    total = 0
    handles = []

    def hook(_m, _i, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    for m in model.modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(hook))
    try:
        model(x1)
    finally:
        for h in handles:
            h.remove()
    return max(total, x1.numel() * x1.element_size())


def auto_eval_batch(
    model: nn.Module, inputs: torch.Tensor, device: torch.device | None = None, memory_budget: int | None = None
) -> int:
    """Most images per forward/backward pass that fit: activation bytes per image x 3 against a memory budget.

    Budget: 60% of free GPU memory on CUDA, 25% of available RAM on CPU, unless given. Capped
    at 256 on CPU (larger batches are not faster there) and 2048 on GPU.
    """
    device = device or model_device(model)
    per = 3 * _activation_bytes(model, inputs[:1].to(device))
    if memory_budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_budget = int(0.6 * free)
        else:
            memory_budget = int(0.25 * _available_ram())
    cap = _GPU_MAX_BATCH if device.type == "cuda" else _CPU_MAX_BATCH
    return int(max(1, min(cap, memory_budget // max(per, 1))))
