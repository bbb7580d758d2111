"""Where code runs: device choice and the torch.distributed context (rank, world size, barrier).

Nothing here assumes CUDA exists. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set)
:func:`init_distributed` starts the process group with ``nccl`` on CUDA and
``gloo`` on CPU, each rank on its own GPU (``LOCAL_RANK``).

:class:`ShardedBatchSampler` / :func:`shard_loader` give each rank a contiguous block
of the batches a single-process loader would form (the same batches, none padded or
repeated), so sums reduced over ranks equal the single-process sums and features
gathered in rank order come back in the single-process order.

Environment: ``TUNELENS_DIST_TIMEOUT`` (seconds) bounds how long a collective waits
for a rank that died (torch's default otherwise: 30 min for gloo, 10 min for nccl);
torchrun itself stops the other workers as soon as one fails.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

__all__ = [
    "ShardedBatchSampler",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "blas_threads",
    "broadcast_module",
    "device_name",
    "init_distributed",
    "is_distributed",
    "is_main",
    "no_tf32",
    "rank",
    "resolve_device",
    "set_determinism",
    "shard_loader",
    "torch_threads",
    "world_size",
]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without an index -> this rank's GPU.

    Under torchrun (``LOCAL_RANK`` set) ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` (modulo the
    number of GPUs), so every rank of a node gets its own GPU; ``cuda:i`` is taken as given.
    ``cuda`` or ``cuda:i`` without a GPU is an error that says so.
    """
    if isinstance(device, torch.device):
        if device.type == "cuda" and device.index is None:
            return resolve_device("cuda")
        return device
    device = (device or "auto").strip().lower()
    if device == "auto":
        if torch.cuda.is_available():
            return _local_gpu()
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device} was asked for but this machine has no usable CUDA GPU; "
                "use --device cpu or --device auto"
            )
        d = torch.device(device)
        if d.index is None:
            return _local_gpu()
        if d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) present")
        return d
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N")


def _local_gpu() -> torch.device:
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def device_name(device: str | torch.device | None = "auto") -> str:
    """The device as a rank-independent string for configuration hashes and manifests: ``cpu``, ``cuda``
    (one GPU per rank, chosen by ``LOCAL_RANK``) or ``cuda:i`` when the user named a GPU. Every rank of a
    torchrun job gets the same string, so cache keys agree across ranks."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev.type
    named = isinstance(device, torch.device) and device.index is not None
    named = named or (isinstance(device, str) and device.strip().lower().startswith("cuda:"))
    return str(dev) if named else "cuda"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


_get_rank, _get_world_size = rank, world_size  # for code whose arguments are called rank / world_size


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


def broadcast_module(model: torch.nn.Module, src: int = 0, parameters: bool = True) -> torch.nn.Module:
    """Copy rank ``src``'s buffers (and parameters, unless ``parameters=False``) into every rank's ``model``,
    in place; a no-op in one process.

    DDP keeps parameters equal, but each rank's BatchNorm running statistics see its own last batch;
    after this every rank holds exactly the model rank ``src`` saves."""
    if not is_distributed():
        return model
    with torch.no_grad():
        for t in (list(model.parameters()) if parameters else []) + list(model.buffers()):
            dist.broadcast(t.data, src=src)
    return model


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def _timeout() -> timedelta | None:
    raw = os.environ.get("TUNELENS_DIST_TIMEOUT")
    if not raw:
        return None
    try:
        return timedelta(seconds=float(raw))
    except ValueError:
        raise ValueError(f"TUNELENS_DIST_TIMEOUT={raw!r}: expected a number of seconds") from None


def _report_errors_to_torchrun() -> None:
    """Under torchrun, write an uncaught exception to the agent's error file (what ``@record`` does), so
    the run's summary names the failing rank and its error as the root cause."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE") or getattr(sys.excepthook, "_tunelens", False):
        return
    previous = sys.excepthook

    def hook(tp, value, tb):
        try:
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            try:  # record_exception formats the exception being handled: make this one the current one
                raise value.with_traceback(tb)
            except BaseException as e:
                ErrorHandler().record_exception(e)
        except Exception:
            pass
        previous(tp, value, tb)

    hook._tunelens = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def init_distributed(device: str = "auto", timeout: timedelta | None = None) -> torch.device:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1); return this rank's device.

    Backend: ``nccl`` when this rank's device is CUDA, ``gloo`` otherwise. ``timeout`` (default:
    ``TUNELENS_DIST_TIMEOUT`` seconds, else torch's default) bounds a collective waiting for a dead rank.
    """
    dev = resolve_device(device)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        if (
            dev.type == "cuda"
            and device_name(device) != "cuda"
            and int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])) > 1
        ):
            raise ValueError(
                f"--device {device} puts every process of this node on the same GPU; under torchrun "
                "use --device cuda (or auto): process r of a node then uses GPU r"
            )
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        kw: dict[str, Any] = {}
        timeout = timeout or _timeout()
        if timeout is not None:
            kw["timeout"] = timeout
        if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            kw["device_id"] = dev  # binds the communicator to this rank's GPU (no guessing in barrier())
        _report_errors_to_torchrun()
        dist.init_process_group(backend=backend, **kw)
    return dev


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's share of the batches of ``batch_sampler``: a contiguous block of them.

    The batches are exactly those a single process forms (same composition, the last one short, none
    padded or repeated); rank ``r`` of ``W`` gets batches ``[start_r, end_r)`` of the ``B`` batches, the
    first ``B mod W`` ranks one more than the others. Because the blocks are in rank order, anything
    gathered in rank order (features, per-sample rows) is in single-process order. A rank may get no
    batch when there are fewer batches than ranks. ``offsets()`` gives the position (in the
    single-process order) of the first sample of each of this rank's batches.
    """

    def __init__(self, batch_sampler: BatchSampler, rank: int | None = None, world_size: int | None = None) -> None:
        self.batch_sampler = batch_sampler
        self.rank = _get_rank() if rank is None else rank
        self.world_size = _get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")

    def _block(self, n: int) -> tuple[int, int]:
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def __len__(self) -> int:
        start, end = self._block(len(self.batch_sampler))
        return end - start

    def __iter__(self):
        start, end = self._block(len(self.batch_sampler))
        for i, b in enumerate(self.batch_sampler):
            if i >= end:
                break
            if i >= start:
                yield b

    def offsets(self) -> list[int]:
        """Single-process position of the first sample of each of this rank's batches."""
        start, end = self._block(len(self.batch_sampler))
        bs = self.batch_sampler.batch_size
        return [i * bs for i in range(start, end)]


def shard_loader(
    dataset: Any,
    batch_size: int,
    shuffle: bool = False,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    drop_last: bool = False,
    **kw: Any,
) -> DataLoader:
    """A DataLoader over this rank's block of the batches a single-process loader forms.

    In a single process it is ``DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, **kw)``
    (with a ``seed``-ed generator when shuffling, the same permutation on every rank). ``device``: a CUDA
    device turns on pinned memory unless ``pin_memory`` is given. ``**kw``: other DataLoader options
    (``num_workers``, ``collate_fn`` ...); not ``sampler`` / ``batch_sampler``.
    """
    if "sampler" in kw or "batch_sampler" in kw:
        raise TypeError("shard_loader forms its own batches; do not pass sampler or batch_sampler")
    if device is not None and "pin_memory" not in kw:
        kw["pin_memory"] = resolve_device(device).type == "cuda"
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    if world_size() <= 1:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=gen, **kw)
    sampler = RandomSampler(dataset, generator=gen) if shuffle else SequentialSampler(dataset)
    bs = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=ShardedBatchSampler(bs), **kw)


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy and torch; deterministic algorithms where cheap. TF32 off for numerics."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
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


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch (MKL/OpenMP) intra-op threads set to ``n`` for the block, then restored; None: left as is."""
    prev = torch.get_num_threads()
    if n is None or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def blas_threads(n: int = 1):
    """numpy/scipy's BLAS pool (OpenBLAS in the wheels) capped at ``n`` threads inside the block (a context
    manager; restored after). Small scikit-learn fits (the logistic-regression probes: a few thousand samples,
    a few hundred features) run ~40x faster on one thread than on two of a 2-core machine (measured: 0.05 s
    against 2.0 s for 800 x 128 features, 8 classes): the threads spin-wait on tiny products."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(limits=n, user_api="blas")
