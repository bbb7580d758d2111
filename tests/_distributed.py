"""Shared by the multi-process tests: run a function on 2 gloo ranks, or in one process on one thread."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _rank_main(rank: int, fn: Callable[[int], Any], init: str, out: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(rank)
        if rank == 0:
            with open(out, "wb") as f:
                pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_two_ranks(fn: Callable[[int], Any], tmp_path: Path, timeout_s: float = 120) -> Any:
    """``fn(rank)`` in 2 spawned gloo processes (one thread each); rank 0's result. ``fn`` must be a
    module-level function (it is pickled into the children)."""
    out = tmp_path / "rank0.pkl"
    mp.spawn(_rank_main, args=(fn, f"file://{tmp_path / 'init'}", str(out), timeout_s), nprocs=WORLD, join=True)
    with open(out, "rb") as f:
        return pickle.load(f)


def single_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with torch on one thread (as each rank runs), the thread count restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


#: The smallest pipeline the CLI runs (tiny data, one epoch, one strategy): for tests of run files, not numbers.
TINY = [
    "--quick",
    "--device",
    "cpu",
    "--no-progress",
    "--set",
    'finetune.strategies=["full"]',
    "--set",
    "pretrain.epochs=1",
    "--set",
    "finetune.common.epochs=1",
    "--set",
    "data.source.train_per_class=8",
    "--set",
    "data.target.train_per_class=8",
]
