"""What an attribution explains: the target class of each input (given labels, one class, or the model's own
prediction)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelens.core.models import model_device

__all__ = ["predictions", "resolve_targets"]


@torch.no_grad()
def predictions(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max class of the model's logits for each input (eval mode assumed), on the CPU."""
    dev = model_device(model)
    return torch.cat(
        [model(inputs[i : i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(inputs), batch_size)]
    )


def resolve_targets(model: nn.Module, inputs: torch.Tensor, target: Any) -> torch.Tensor:
    """Target class per input as a CPU long tensor: an int, a sequence/tensor of labels, or ``"pred"``."""
    n = len(inputs)
    if target is None:
        raise ValueError(
            "a target is needed: pass the true labels (target=labels) or target='pred' for the model's own prediction"
        )
    if isinstance(target, str):
        if target in ("pred", "prediction", "own"):
            return predictions(model, inputs)
        raise ValueError(f"unknown target {target!r}: use labels, an int, or 'pred'")
    t = torch.as_tensor(target).long().cpu()
    if t.ndim == 0:
        return t.repeat(n)
    if t.shape != (n,):
        raise ValueError(f"target has shape {tuple(t.shape)}; expected ({n},) for {n} inputs")
    return t
