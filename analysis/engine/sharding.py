"""Sharding the analyses' data over ``torch.distributed`` ranks, and gathering per-sample results back.

The analyses are sums over batches (minibatch CKA's HSIC sums, correct counts and summed
losses) or per-sample rows (predictions, probe features). Both come out as in one process
when every rank runs the *same batches a single process would form*, each rank a different
share of them, and the results are reduced (sums) or gathered (rows):

* :func:`shard_loader` (from :mod:`finetune.runtime`) builds that loader: in one process it is
  exactly ``DataLoader(dataset, batch_size, shuffle=...)``; under ``torch.distributed`` rank
  ``r`` gets a contiguous block of those batches (:class:`~finetune.runtime.ShardedBatchSampler`),
  none padded or repeated, unlike ``DistributedSampler``, which pads with repeated samples and
  deals out *samples*, so minibatch CKA (which depends on which samples share a batch) and
  the counts would change.
* :func:`gather_rows` collects per-sample rows from all ranks into one DataFrame in
  single-process order; :func:`batch_offsets` tells a loop over such a loader where each of its
  batches starts in that order.

Everything here is a no-op in a single process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from tunelens.core.runtime import ShardedBatchSampler, all_gather_objects, shard_loader, world_size

__all__ = ["ShardedBatchSampler", "batch_offsets", "gather_rows", "per_sample_batch_size", "shard_loader"]


def per_sample_batch_size(n: int, batch_size: int) -> int:
    """A batch size for a loader whose results are per sample (eval-mode predictions, features, summed
    losses -- not minibatch CKA): ``batch_size`` itself, unless that would leave some rank without a batch;
    then ``n // world_size`` (at least 1), so each of up to ``n`` ranks gets one. In one process:
    ``batch_size``."""
    ws = world_size()
    if ws <= 1 or -(-n // batch_size) >= ws:
        return batch_size
    return max(1, n // ws)


def batch_offsets(loader: Iterable) -> list[int] | None:
    """Where each batch of ``loader`` starts in the single-process sample order, when ``loader`` was made by
    :func:`shard_loader` under ``torch.distributed``; ``None`` otherwise (then positions are simply counted
    from 0 along the loader, which is the single-process order)."""
    bs = getattr(loader, "batch_sampler", None)
    return bs.offsets() if isinstance(bs, ShardedBatchSampler) else None


def gather_rows(
    rows: Sequence[dict[str, Any]] | pd.DataFrame, sort_by: str | Sequence[str] | None = None
) -> pd.DataFrame:
    """All ranks' rows as one DataFrame (a collective: call it on every rank).

    ``rows``: this rank's rows (a list of dicts or a DataFrame). The parts are concatenated in rank
    order, which for a :func:`shard_loader` loader is already the single-process order; ``sort_by``
    (e.g. the sample index) additionally sorts them, stably, to restore that order whatever the
    sharding; it is applied in a single process too, so the order never depends on the number of ranks.
    """
    frame = rows.reset_index(drop=True) if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if world_size() <= 1:
        out = frame
    else:
        parts = [p for p in all_gather_objects(frame) if len(p)]
        out = pd.concat(parts, ignore_index=True) if parts else frame
    if sort_by is not None and len(out):
        out = out.sort_values(list([sort_by] if isinstance(sort_by, str) else sort_by), kind="stable")
        out = out.reset_index(drop=True)
    return out
