"""Reading batches and evaluating a classifier (accuracy and loss), reduced across ranks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime
from .models import eval_mode

__all__ = ["evaluate", "unpack_batch"]


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(inputs, labels or None, masks or None)`` from a loader's batch (tensor, (x, y) or (x, y, mask))."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        return batch["inputs"], batch.get("labels"), batch.get("masks")
    if isinstance(batch, (list, tuple)) and batch:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        m = batch[2] if len(batch) > 2 else None
        return x, y, m
    raise TypeError(
        f"a batch must be a tensor, a (inputs, labels[, masks]) tuple or a dict; got {type(batch).__name__}"
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy and mean cross-entropy over a loader; sums are reduced across ranks when distributed."""
    device = runtime.resolve_device(device)
    tot = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    with eval_mode(model):
        for batch in loader:
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            out = model(x)
            tot[0] += (out.argmax(1) == y).sum()
            tot[1] += F.cross_entropy(out.float(), y, reduction="sum").double()
            tot[2] += len(y)
    runtime.all_reduce_sum(tot)
    n = max(tot[2].item(), 1)
    return {"acc": tot[0].item() / n, "loss": tot[1].item() / n, "n": int(tot[2].item())}
