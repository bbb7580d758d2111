"""Choosing layers and capturing their activations with forward hooks.

One mechanism serves CKA, activation statistics and per-layer probes:
:class:`ActivationCapture` hooks exact module names (never loose matches), hands
each output to a callback *inside the hook* (so a later in-place op such as
torchvision's ``ReLU(inplace=True)`` cannot overwrite what was seen), refuses
modules that fire more than once per forward pass (torchvision's
``BasicBlock.relu`` runs twice: its activations would silently mix), and always
removes its hooks, even on error. :func:`iterate_pair` runs a loader once through
two models and yields both models' captured features per batch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from tunelens.core.evaluation import unpack_batch
from tunelens.core.hooks import ActivationCapture, split_view
from tunelens.core.models import eval_mode
from tunelens.core.naming import stage_of
from tunelens.core.stages import stages

__all__ = [
    "ActivationCapture",
    "LayerSpec",
    "iterate_features",
    "iterate_pair",
    "resolve_layers",
    "stage_of",
    "unpack_batch",
]

LayerSpec = str | Sequence[str] | type | tuple[type, ...]


def _auto_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    return stages(model, example).cka_layers()


def resolve_layers(model: nn.Module, layers: LayerSpec = "auto", example: torch.Tensor | None = None) -> list[str]:
    """Exact module names to capture.

    ``"auto"``: one output per stage of :func:`tunelens.core.stages.stages` (``example``: an input
    batch, default a dummy image), the pooled features and the logits: for ResNets ``maxpool``,
    ``layer1`` .. ``layer4``, ``avgpool``, ``fc``; channels-last stages (Swin) with the view ``[nhwc]``;
    token stages (ViT) twice, the class token ``[cls]`` and the mean patch token ``[patch_mean]``.
    A list of names is checked against ``model.named_modules()`` (a name may carry a view, e.g.
    ``encoder.ln[cls]``; unknown names are an error with close matches suggested); a module type (or
    tuple of types) selects every module of that type.
    """
    named = dict(model.named_modules())
    if isinstance(layers, str) and layers == "auto":
        return _auto_layers(model, example)
    if isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)):
        out = [n for n, m in named.items() if n and isinstance(m, layers)]
        if not out:
            raise ValueError(f"model has no module of type {layers}")
        return out
    if isinstance(layers, str):
        layers = [layers]
    out = []
    for name in layers:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {type(name).__name__}")
        module, _ = split_view(name)
        if module not in named or module == "":
            close = difflib.get_close_matches(name, [n for n in named if n], n=3)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise ValueError(
                f"layer {name!r} is not a module of {type(model).__name__}.{hint} "
                "Layer names must match model.named_modules() exactly."
            )
        if name not in out:
            out.append(name)
    return out


def iterate_features(
    model: nn.Module, loader: Iterable, layers: Sequence[str], device: torch.device | str = "cpu"
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None, Any]]:
    """Yield ``(features, labels, batch)`` per batch: copies of each layer's output, in eval mode, without grad."""
    cap = ActivationCapture(model, layers)
    with eval_mode(model), cap, torch.no_grad():
        for batch in loader:
            x, y, _ = unpack_batch(batch)
            cap.features = {}
            model(x.to(device, non_blocking=True))
            yield dict(cap.features), y, batch


def iterate_pair(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    layers_a: Sequence[str],
    layers_b: Sequence[str],
    device: torch.device | str = "cpu",
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None, Any]]:
    """Run each batch of ``loader`` through both models once; yield ``(feats_a, feats_b, labels, batch)``."""
    cap_a, cap_b = ActivationCapture(model_a, layers_a), ActivationCapture(model_b, layers_b)
    with eval_mode(model_a, model_b), cap_a, cap_b, torch.no_grad():
        for batch in loader:
            x, y, _ = unpack_batch(batch)
            x = x.to(device, non_blocking=True)
            cap_a.features, cap_b.features = {}, {}
            model_a(x)
            model_b(x)
            yield dict(cap_a.features), dict(cap_b.features), y, batch
