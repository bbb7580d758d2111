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
from tunelens.core.hooks import ActivationCapture
from tunelens.core.naming import stage_of

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


def _is_resnet_like(model: nn.Module) -> bool:
    names = dict(model.named_children())
    return all(k in names for k in ("conv1", "layer1", "layer4", "fc"))


def _auto_layers(model: nn.Module) -> list[str]:
    children = dict(model.named_children())
    own = getattr(model, "tunelens_layers", None)
    if callable(own):  # a model that names its own readable layers (text: the masked-mean taps per layer)
        from tunelens.core.naming import head_name

        return list(own()) + [head_name(model)]
    if _is_resnet_like(model):
        stem = "maxpool" if "maxpool" in children else "relu"
        out = [stem] + [f"layer{i}" for i in range(1, 5) if f"layer{i}" in children]
        if "avgpool" in children:
            out.append("avgpool")
        return out + ["fc"]
    if "features" in children and isinstance(children["features"], nn.Sequential):
        out = [f"features.{n}" for n, _ in children["features"].named_children()]
        if "avgpool" in children:
            out.append("avgpool")
        from tunelens.core.naming import head_name

        return out + [head_name(model)]
    enc = getattr(model, "encoder", None)
    if enc is not None and isinstance(getattr(enc, "layers", None), nn.Sequential):
        out = [f"encoder.layers.{n}" for n, _ in enc.layers.named_children()]
        from tunelens.core.naming import head_name

        return out + [head_name(model)]
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())]


def resolve_layers(model: nn.Module, layers: LayerSpec = "auto") -> list[str]:
    """Exact module names to capture.

    ``"auto"``: for ResNets the stem output, ``layer1`` .. ``layer4``, the pooled features
    (``avgpool``) and the logits (``fc``); for ``features``-style models (VGG, ConvNeXt,
    EfficientNet, MobileNet ...) each block of ``features``; for ViTs each encoder layer; for a model
    with ``tunelens_layers()`` (text: the attention-masked mean of every layer's tokens) those, then the head.
    A list of names is checked against ``model.named_modules()`` (unknown names are an
    error with close matches suggested); a module type (or tuple of types) selects every
    module of that type.
    """
    named = dict(model.named_modules())
    if isinstance(layers, str) and layers == "auto":
        return _auto_layers(model)
    if isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)):
        out = [n for n, m in named.items() if n and isinstance(m, layers)]
        if not out:
            raise ValueError(f"model has no module of type {layers}")
        return out
    if isinstance(layers, str):
        layers = [layers]
    out = []
    for name in layers:
        if name not in named or name == "":
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
    was = model.training
    model.eval()
    cap = ActivationCapture(model, layers)
    try:
        with cap, torch.no_grad():
            for batch in loader:
                x, y, _ = unpack_batch(batch)
                cap.features = {}
                model(x.to(device, non_blocking=True))
                yield dict(cap.features), y, batch
    finally:
        model.train(was)


def iterate_pair(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    layers_a: Sequence[str],
    layers_b: Sequence[str],
    device: torch.device | str = "cpu",
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None, Any]]:
    """Run each batch of ``loader`` through both models once; yield ``(feats_a, feats_b, labels, batch)``."""
    was_a, was_b = model_a.training, model_b.training
    model_a.eval()
    model_b.eval()
    cap_a, cap_b = ActivationCapture(model_a, layers_a), ActivationCapture(model_b, layers_b)
    try:
        with cap_a, cap_b, torch.no_grad():
            for batch in loader:
                x, y, _ = unpack_batch(batch)
                x = x.to(device, non_blocking=True)
                cap_a.features, cap_b.features = {}, {}
                model_a(x)
                model_b(x)
                yield dict(cap_a.features), dict(cap_b.features), y, batch
    finally:
        model_a.train(was_a)
        model_b.train(was_b)
