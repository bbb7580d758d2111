"""Using the caller's models without changing them: where a model lives, and borrowing it on a device."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["borrowed", "channels_last_helps", "eval_mode", "fast_layout", "model_device", "same_device"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without either)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` (the current GPU) are the same device; otherwise type and index must match."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    cur = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)


@contextmanager
def borrowed(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The caller's ``model`` for use on ``device``, given back unchanged.

    When it already lives on ``device`` it is used as is and the ``training`` flag of every module is
    restored on exit (an analysis may switch it to eval mode); otherwise a copy is moved to ``device``,
    so the caller's model is never moved."""
    if same_device(model_device(model), device):
        flags = [m.training for m in model.modules()]
        try:
            yield model
        finally:
            for m, f in zip(model.modules(), flags, strict=True):
                m.training = f
    else:
        yield copy.deepcopy(model).to(device)


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block; each module's own ``training`` flag restored
    on exit (``model.train(was)`` would not: it sets one flag for all, e.g. thawing a probe's frozen BatchNorm)."""
    flags = [[m.training for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, fl in zip(models, flags, strict=True):
            for m, f in zip(model.modules(), fl, strict=True):
                m.training = f


def channels_last_helps(model: nn.Module, device: torch.device | str) -> bool:
    """Whether ``model`` runs faster on ``device`` with channels-last (NHWC) weights: on the CPU, a convnet
    with BatchNorm and without LayerNorm. Measured by ``bench/channels_last.py`` (2 CPU cores, weights converted,
    inputs left NCHW): ResNets, EfficientNet, MobileNet and DenseNet ran their forward pass 1.2-1.8x and their
    input-gradient pass 1.2-1.6x faster; VGG (no BatchNorm) and ConvNeXt (LayerNorm) did not gain. A rule on
    the architecture, not a timing, so the same model always runs the same kernels (deterministic numbers)."""
    if torch.device(device).type != "cpu":
        return False
    kinds = {type(m) for m in model.modules()}
    has = lambda cls: any(issubclass(k, cls) for k in kinds)
    return has(nn.Conv2d) and has(nn.BatchNorm2d) and not has(nn.LayerNorm)


def fast_layout(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` in the memory layout that is fastest on ``device`` (:func:`channels_last_helps`): a copy with
    channels-last weights, or ``model`` itself. The values are the same; float32 results differ from the
    NCHW layout's by rounding only (other convolution kernels). The caller's model is never changed."""
    if not channels_last_helps(model, device):
        return model
    return copy.deepcopy(model).to(memory_format=torch.channels_last)
