"""A linear probe on cached features: the frozen backbone's head inputs, computed once.

When only the head trains (the ``linear_probe`` strategy, the probe phase of ``lp_ft``), the backbone
is frozen in eval mode and, without augmentation or dropout before the head, it maps every image to
the same features in every epoch; training the head on those features is the same computation as
running the whole network each step (same batches, shuffling, optimiser and model selection),
without the backbone's cost (checked in tests/test_strategies.py). This is the usual "extract
features, then fit a linear classifier" of Kornblith, Shlens & Le 2019, "Do Better ImageNet Models
Transfer Better?".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tunelens.core import runtime

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = ["cacheable", "head_inputs"]


def cacheable(model: nn.Module, cfg: TrainConfig, phase: str, head: str, device: torch.device) -> bool:
    """Whether a probe phase can train on cached head inputs with the same result: the head is an
    ``nn.Linear``, nothing random runs before it (augmentation, active dropout, a timm ``drop_rate``),
    one process, no autocast."""
    if phase != "linear_probe" or not cfg.cache_features or cfg.augment or runtime.is_distributed():
        return False
    if cfg.amp and device.type == "cuda":
        return False
    if not isinstance(model.get_submodule(head), nn.Linear) or float(getattr(model, "drop_rate", 0) or 0) > 0:
        return False
    return not any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 and not n.startswith(head)
        for n, m in model.named_modules()
    )


@torch.no_grad()
def head_inputs(model: nn.Module, head: str, data: Dataset, device: torch.device) -> TensorDataset:
    """``(input of the head, label)`` for every item of ``data``, computed once in the model's current modes."""
    feats, labels = [], []
    hook = model.get_submodule(head).register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach()))
    try:
        for batch in DataLoader(data, batch_size=64, shuffle=False):
            model(batch[0].to(device))
            labels.append(batch[1])
    finally:
        hook.remove()
    return TensorDataset(torch.cat(feats).cpu(), torch.cat(labels))
