"""Loading checkpoints that tunelens did not write: safely, from the layouts people actually save.

Accepted files (recognised by their content, not their suffix):

* **safetensors** (``.safetensors``), read with :func:`safetensors.torch.load_file`;
* **torch.save** files (``.pt``, ``.pth``, ``.ckpt``, ``.bin``), read with
  ``torch.load(weights_only=True)``: tensors and plain containers only, so a pickle can
  never run code while it loads. The state dict may be the whole file, or nested under
  ``state_dict`` (Lightning), ``model`` (torchvision's reference scripts),
  ``model_state_dict``, ``module``, ``net`` ...; the bookkeeping next to it (epoch,
  optimizer state, ``argparse.Namespace`` arguments, Lightning's ``AttributeDict``
  hyper-parameters) is read as plain data and ignored.
* ``torchvision:WEIGHTS`` (``torchvision:IMAGENET1K_V1``, ``torchvision:ResNet18_Weights.DEFAULT``):
  torchvision's pretrained weights for the architecture, read from the local torch hub
  cache (``torch.hub.get_dir()/checkpoints``); never downloaded.

Parameter names lose the wrappers' prefixes: ``module.`` (DistributedDataParallel,
DataParallel), ``_orig_mod.`` (``torch.compile``), and -- in :func:`load_model`, when the
model itself has no such prefix -- a prefix shared by every key (Lightning's ``model.``).

Every failure is a :class:`CheckpointLoadError` (a ``ValueError``) whose message names the
file, what is wrong and what to do about it.

The code lives in :mod:`.safe_load` (reading files), :mod:`.state_dicts` (layouts, prefixes) and
:mod:`.architectures` (skeletons, torchvision weights, suggestions); this module loads models and
re-exports their public names.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelens.analysis.io.architectures import (
    build_architecture,
    infer_num_classes,
    is_torchvision_spec,
    mismatch_error,
    skeleton,
    suggest_archs,
    torchvision_weights,
    torchvision_weights_file,
)
from tunelens.analysis.io.safe_load import (
    CheckpointArchitectureError,
    CheckpointLoadError,
    ClassCountError,
    first_line,
    read_checkpoint_file,
)
from tunelens.analysis.io.state_dicts import (
    NESTED_KEYS,
    align_keys,
    check_finite,
    diff_keys,
    dtype_mismatch,
    extract_state_dict,
    strip_prefixes,
)

__all__ = [
    "NESTED_KEYS",
    "CheckpointArchitectureError",
    "CheckpointLoadError",
    "ClassCountError",
    "LoadReport",
    "check_finite",
    "infer_num_classes",
    "is_torchvision_spec",
    "load_model",
    "load_report",
    "load_state_dict",
    "suggest_archs",
    "torchvision_weights",
    "torchvision_weights_file",
]


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (see the module docstring for the layouts), on the CPU, prefixes stripped.

    Raises :class:`CheckpointLoadError` for a missing, empty, truncated or corrupt file, a file
    that is not a checkpoint, and a pickle that would need more than tensors and plain containers
    (it is refused without being run).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointLoadError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointLoadError(f"checkpoint {path} is a folder, expected a .safetensors, .pt or .pth file")
    try:
        obj = read_checkpoint_file(path)
    except PermissionError as e:
        raise CheckpointLoadError(f"checkpoint {path} cannot be read: {e.strerror}") from None
    sd = extract_state_dict(obj, path)
    sd = strip_prefixes(sd)
    return {k: (v.detach() if v.requires_grad else v) for k, v in sd.items()}


def load_model(
    arch: str,
    path: str | os.PathLike | Mapping[str, torch.Tensor],
    num_classes: int | None = None,
    strict: bool = True,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build ``arch`` and load the weights of ``path`` into it; returns the model in eval mode.

    ``arch``: a torchvision classifier name (``resnet50``...), ``tiny_resnet`` or ``module:function``
    (a factory called as ``function(num_classes=...)``, imported from the working directory).
    ``path``: a checkpoint file (see :func:`load_state_dict`), ``torchvision:WEIGHTS`` (from the local
    torch cache, never downloaded) or a state dict. ``num_classes``: None reads it from the head's
    weight; given, it must match (:class:`ClassCountError` otherwise). ``strict=False`` loads what
    fits and ignores the rest, with a ``UserWarning`` that counts and names the missing, unexpected and
    mis-shaped entries (:func:`load_report` lists them).

    Raises :class:`CheckpointLoadError` (file problems), :class:`ClassCountError`,
    :class:`CheckpointArchitectureError` (names the first missing, unexpected and mis-shaped
    keys and suggests the architecture the weights fit), ``ValueError`` for an unknown ``arch``.
    """
    from tunelens.core.naming import head_name

    if isinstance(path, Mapping):
        sd, what = strip_prefixes(dict(path)), "the state dict"
    elif is_torchvision_spec(path):
        file = torchvision_weights_file(arch, str(path))
        sd, what = load_state_dict(file), f"{path} ({file})"
    else:
        sd, what = load_state_dict(path), f"checkpoint {path}"
    empty = skeleton(arch)
    head = head_name(empty)
    sd = align_keys(sd, set(empty.state_dict()))
    hw = sd.get(f"{head}.weight")
    found = int(hw.shape[0]) if hw is not None and hw.ndim >= 1 else None
    if num_classes is None:
        if found is None:
            missing, unexpected, shaped = diff_keys(sd, empty.state_dict())
            raise mismatch_error(arch, what, sd, missing, unexpected, shaped)
        num_classes = found
    elif found is not None and found != num_classes:
        raise ClassCountError(
            f"{what} has a {found}-class head ({head}.weight is "
            f"{'x'.join(map(str, hw.shape if hw is not None else ()))}) but {num_classes} classes were asked for: pass "
            f"num_classes={found}, or the checkpoint trained for your {num_classes} classes"
        )
    model = skeleton(arch, num_classes)
    ref = model.state_dict()
    wrong = dtype_mismatch(sd, ref)
    if wrong:
        raise CheckpointLoadError(f"{what} {wrong}")
    missing, unexpected, shaped = diff_keys(sd, ref)
    if strict and (missing or unexpected or shaped):
        raise mismatch_error(arch, what, sd, missing, unexpected, shaped)
    fit = {k: v for k, v in sd.items() if k in ref and tuple(v.shape) == tuple(ref[k].shape)}
    buffers = {n for n, _ in model.named_buffers()}
    complete = not missing and buffers <= set(ref) and any(t.is_meta for t in ref.values())
    if complete:  # every tensor comes from the checkpoint: skip the random initialisation
        model = model.to_empty(device="cpu")
        for k, t in model.state_dict().items():
            if k not in fit:  # num_batches_tracked absent from the file
                with torch.no_grad():
                    t.zero_()
    else:
        model = build_architecture(arch, num_classes)
    try:
        model.load_state_dict(fit, strict=False)
    except RuntimeError as e:  # e.g. dtype problems
        raise CheckpointLoadError(f"{what} cannot be loaded into {arch}: {first_line(e)}") from None
    if missing or unexpected or shaped:
        report = LoadReport(tuple(missing), tuple(unexpected), tuple(k for k, _, _ in shaped))
        warnings.warn(f"{what} loaded into {arch} non-strictly: {report.describe()}", UserWarning, stacklevel=2)
    return model.to(device).eval()


@dataclass(frozen=True)
class LoadReport:
    """What a non-strict load left out: state entries the model has but the file lacks (``missing``), entries
    of the file the model lacks (``unexpected``), and entries whose shapes differ (``mis_shaped``)."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mis_shaped: tuple[str, ...] = ()

    def describe(self, show: int = 3) -> str:
        parts = []
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped", self.mis_shaped),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:show])}{', ...' if len(keys) > show else ''})")
        return "; ".join(parts) or "everything fits"


def load_report(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """What loading ``state_dict`` into ``model`` non-strictly leaves out (the model is not changed)."""
    ref = model.state_dict()
    return LoadReport(
        tuple(k for k in ref if k not in state_dict),
        tuple(k for k in state_dict if k not in ref),
        tuple(k for k in ref if k in state_dict and tuple(ref[k].shape) != tuple(state_dict[k].shape)),
    )
