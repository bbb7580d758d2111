"""The architecture catalogue: the small default ResNet, any torchvision classifier by name, any timm
classifier as ``timm:NAME`` (timm imported lazily: it is an optional dependency), user factories.

Shared by fine-tuning (building a model to train) and analysis (loading a checkpoint by ``--arch``).

Every model exposes the module names of a torchvision ResNet where it is one
(``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``fc``), so the analysis code serves
the default model and torchvision's ResNets alike.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from tunelens.core.naming import head_name, stage_of, stage_order

__all__ = [
    "TIMM_PREFIX",
    "TinyResNet",
    "build_model",
    "head_name",
    "list_archs",
    "replace_head",
    "stage_of",
    "stage_order",
]


class TinyResNet(nn.Module):
    """A ResNet with one BasicBlock per stage, sized for 32x32 inputs on a CPU.

    Same module names as ``torchvision.models.resnet18``: ``conv1``, ``bn1``,
    ``relu``, ``maxpool`` (identity here: the stem keeps full resolution),
    ``layer1`` .. ``layer4`` (strides 1, 2, 2, 2), ``avgpool``, ``fc``.
    For 32x32 inputs ``layer4`` is 4x4, so Grad-CAM at ``layer4`` means something.
    """

    def __init__(
        self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 128), in_channels: int = 3
    ) -> None:
        super().__init__()
        w = widths
        self.conv1 = nn.Conv2d(in_channels, w[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._stage(w[0], w[0], 1)
        self.layer2 = self._stage(w[0], w[1], 2)
        self.layer3 = self._stage(w[1], w[2], 2)
        self.layer4 = self._stage(w[2], w[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride=stride, downsample=down))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def list_archs() -> list[str]:
    """Names accepted by :func:`build_model` (besides ``module:function`` factories)."""
    import torchvision.models as tvm

    return ["tiny_resnet"] + sorted(tvm.list_models(module=tvm))


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"architecture factory {spec!r} must look like 'module:function'")
    # the working directory is on sys.path for this import only (``python -m tunelens`` removes it at start)
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(
            f"cannot import module {mod_name!r} for architecture {spec!r}: {e}. "
            "Run from the folder that holds it, or put it on PYTHONPATH."
        ) from e
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"module {mod_name!r} has no callable {fn_name!r} (from architecture {spec!r})")
    return fn


TIMM_PREFIX = "timm:"


def _build_timm(name: str, num_classes: int, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=...)``: random weights, nothing downloaded.

    See the timm documentation, "Models" (https://huggingface.co/docs/timm)."""
    try:
        import timm
    except ImportError:
        raise ValueError(
            f"architecture {TIMM_PREFIX}{name} needs timm, which is not installed: pip install timm "
            "(or pip install 'tunelens[imagenet]')"
        ) from None
    if not name:
        raise ValueError("architecture 'timm:' needs a model name, e.g. timm:resnet18")
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"unknown timm model {name!r}.{hint} See timm.list_models().")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def replace_head(model: nn.Module, num_classes: int, seed: int | None = None) -> nn.Module:
    """Replace the final classifier by a fresh one with ``num_classes`` outputs (in place)."""
    name = head_name(model)
    old = model.get_submodule(name)
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):  # squeezenet-style conv classifier
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)  # type: ignore[arg-type]
    else:
        raise ValueError(f"cannot replace head {name!r} of type {type(old).__name__}")
    if seed is not None:
        torch.random.set_rng_state(gen_state)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def build_model(arch: str, num_classes: int, seed: int | None = None, **kwargs) -> nn.Module:
    """Build an untrained classifier.

    ``arch`` is ``"tiny_resnet"``, any torchvision classification model name
    (``resnet18``, ``resnet50``, ``convnext_tiny``, ``vit_b_16`` ...), ``"timm:NAME"`` for any
    timm model (``timm:resnet18``, ``timm:tf_efficientnet_lite0``; needs ``pip install timm``), or
    ``"module:function"`` for a user factory imported from the working directory
    (called as ``function(num_classes=num_classes)``), or ``"hf:PATH"`` / ``"hf:PACKAGE"`` for a
    BERT-family Hugging Face encoder with a linear head (:mod:`tunelens.core.text`). Weights are random; load
    them with :func:`tunelens.load_model` (files) or ``model.load_state_dict``.
    """
    if arch.startswith("hf:"):  # a local Hugging Face encoder folder (or a package holding one): random weights
        from tunelens.core.text import build_text_model

        return build_text_model(arch, num_classes, seed=seed, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    if arch.startswith(TIMM_PREFIX):
        return _build_timm(arch[len(TIMM_PREFIX) :], num_classes, **kwargs)
    if ":" in arch:
        model = _import_factory(arch)(num_classes=num_classes, **kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"factory {arch!r} returned {type(model).__name__}, expected an nn.Module")
        return model
    if arch == "tiny_resnet":
        return TinyResNet(num_classes=num_classes, **kwargs)
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if arch not in names:
        import difflib

        close = difflib.get_close_matches(arch, names + ["tiny_resnet"], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown architecture {arch!r}.{hint} Use tiny_resnet, a torchvision "
            "classification model name, timm:NAME, or 'module:function'."
        )
    return tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
