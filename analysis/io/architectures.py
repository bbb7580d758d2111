"""The architecture catalogue: model skeletons, torchvision's cached weights, and architecture suggestions."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelens.analysis.io.safe_load import CheckpointArchitectureError, CheckpointLoadError, first_line
from tunelens.analysis.io.state_dicts import align_keys

__all__ = [
    "infer_num_classes",
    "is_torchvision_spec",
    "suggest_archs",
    "torchvision_weights",
    "torchvision_weights_file",
]


def is_torchvision_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith("torchvision:")


def torchvision_weights(arch: str, spec: str):
    """The torchvision weights enum member named by ``spec`` (``torchvision:IMAGENET1K_V1``,
    ``torchvision:ResNet18_Weights.IMAGENET1K_V1``, ``torchvision:DEFAULT``) for ``arch``."""
    import torchvision.models as tvm

    name = spec.split(":", 1)[1] if is_torchvision_spec(spec) else spec
    if ":" in arch:
        raise CheckpointLoadError(
            f"{spec}: torchvision weights need a torchvision architecture, not the factory {arch!r}"
        )
    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise CheckpointLoadError(
            f"{spec}: torchvision has no pretrained weights for architecture {arch!r} ({first_line(e)})"
        ) from None
    member = name.rsplit(".", 1)[-1]
    prefix = name.rsplit(".", 1)[0] if "." in name else None
    if prefix is not None and prefix != enum.__name__:
        raise CheckpointLoadError(
            f"{spec}: these are weights of another architecture ({prefix}); {arch} takes "
            f"{enum.__name__} ({', '.join(w.name for w in enum)})"
        )
    try:
        return enum[member] if member != "DEFAULT" else enum.DEFAULT
    except KeyError:
        choices = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise CheckpointLoadError(
            f"{spec}: {enum.__name__} has no weights {member!r}; choose one of {choices}"
        ) from None


def torchvision_weights_file(arch: str, spec: str) -> Path:
    """Where torch hub keeps the file of ``spec``'s weights; :class:`CheckpointLoadError` when it is not there.

    Nothing is downloaded: the message says where to put the file and where to get it.
    """
    from urllib.parse import urlparse

    w = torchvision_weights(arch, spec)
    fname = os.path.basename(urlparse(w.url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not path.exists():
        raise CheckpointLoadError(
            f"{spec} for {arch} is not in the local torch cache: put the file {fname} at "
            f"{path} (download it from {w.url}, e.g. with curl -L -o '{path}' '{w.url}'); "
            "tunelens never downloads"
        )
    return path


def build_architecture(arch: str, num_classes: int, meta: bool = False) -> nn.Module:
    """``arch`` with ``num_classes`` outputs (:func:`tunelens.core.architectures.build_model`), on the meta device when ``meta`` (no weights allocated)."""
    from tunelens.core.architectures import build_model

    if meta:
        with torch.device("meta"):
            return build_model(arch, num_classes)
    return build_model(arch, num_classes)


def skeleton(arch: str, num_classes: int = 1000) -> nn.Module:
    """The architecture without allocating its weights where possible (meta device)."""
    try:
        return build_architecture(arch, num_classes, meta=True)
    except Exception:
        return build_architecture(arch, num_classes)


def infer_num_classes(arch: str, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Outputs of the classification head in ``state_dict`` (None when its weight is not there)."""
    from tunelens.core.naming import head_name

    head = head_name(skeleton(arch))
    w = state_dict.get(f"{head}.weight")
    if w is None or w.ndim < 1:
        return None
    return int(w.shape[0])


_FAMILIES = [  # (name prefixes of a family, a key only that family has)
    (("resnet", "resnext", "wide_resnet"), "layer1.0.conv1.weight"),
    (("densenet",), "features.denseblock1."),
    (("vit_",), "encoder.layers.encoder_layer_0."),
    (("swin",), ".attn.relative_position_bias_table"),
    (("convnext",), ".layer_scale"),
    (("efficientnet",), "features.1.0.block.0.0.weight"),
    (("mobilenet_v3",), "features.1.block.0.0.weight"),
    (("mobilenet_v2",), "features.1.conv.0.0.weight"),
    (("vgg",), "features.0.weight"),
    (("alexnet",), "features.0.weight"),
    (("squeezenet",), ".squeeze.weight"),
    (("shufflenet",), "stage2.0.branch"),
    (("mnasnet",), "layers.0.weight"),
    (("googlenet",), "inception3a."),
    (("inception",), "Mixed_5b."),
    (("maxvit",), "blocks.0.layers.0."),
    (("regnet",), "trunk_output.block1."),
]


def _family_of(arch: str) -> tuple[str, ...]:
    for prefixes, _ in _FAMILIES:
        if arch.startswith(prefixes):
            return prefixes
    m = re.match(r"[a-z]+", arch)
    return (m.group(0),) if m else ()


def suggest_archs(
    state_dict: Mapping[str, torch.Tensor], arch: str | None = None, k: int = 3, max_candidates: int = 14
) -> list[tuple[str, float]]:
    """torchvision architectures whose state dict fits ``state_dict`` best: ``[(name, fraction of tensors that
    fit by name and shape)]``, best first. Candidates: ``arch``'s family and the families the keys point to."""
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    prefixes: list[str] = []
    if arch and ":" not in arch:
        prefixes += list(_family_of(arch))
    keys = list(state_dict)
    for fam, marker in _FAMILIES:
        if any(marker in key for key in keys):
            prefixes += [p for p in fam if p not in prefixes]
    cands = [n for n in names if n.startswith(tuple(prefixes)) and n != arch and not n.startswith("regnet_y_128")]
    cands = cands[:max_candidates]
    from tunelens.core.naming import head_name

    out = []
    for name in cands:
        try:
            skel = skeleton(name)
            ref, head = skel.state_dict(), head_name(skel)
        except Exception:
            continue
        sd = align_keys(dict(state_dict), set(ref))
        fit = sum(
            1
            for key, v in ref.items()
            if key in sd and (tuple(sd[key].shape) == tuple(v.shape) or key.startswith(head + "."))
        )
        out.append((name, fit / max(len(ref), len(sd), 1)))
    out.sort(key=lambda t: -t[1])
    return [t for t in out[:k] if t[1] > 0.5]


def _names(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def mismatch_error(
    arch: str, what: str, sd: Mapping[str, torch.Tensor], missing, unexpected, shaped
) -> CheckpointArchitectureError:
    """The error for a state dict that does not fit ``arch``: what is missing, unexpected and shaped differently, in a few lines."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    if shaped:
        parts.append(
            f"{len(shaped)} mis-shaped: "
            + ", ".join(
                f"{k} is {'x'.join(map(str, a))} in the checkpoint, {'x'.join(map(str, b))} in {arch}"
                for k, a, b in shaped[:3]
            )
            + (f" (+{len(shaped) - 3} more)" if len(shaped) > 3 else "")
        )
    sugg = suggest_archs(sd, arch)
    own_fit = (len(sd) - len(unexpected) - len(shaped)) / max(len(sd) + len(missing), 1)
    if sugg and sugg[0][1] >= 0.999:  # only an architecture that takes every tensor is worth suggesting
        hint = f" It fits {sugg[0][0]} exactly: try --arch {sugg[0][0]}."
    elif own_fit >= 0.9:
        hint = (
            f" Every other tensor fits {arch}: the file lacks or adds the tensors named (a modified model, "
            "or one saved incompletely)."
        )
    else:
        hint = (
            " No torchvision architecture takes all of its tensors; if you trained your own model class, "
            "pass --arch module:function."
        )
    return CheckpointArchitectureError(f"{what} does not fit architecture {arch}: " + "; ".join(parts) + "." + hint)
