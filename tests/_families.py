"""Small random-weight builders of every family tunelens is used with (shared by the family tests)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torchvision.models as tvm
from torch import nn
from torch.utils.data import TensorDataset

from tunelens.core.architectures import replace_head


class Block(nn.Module):
    """A residual conv block (the factory below keeps these in an nn.ModuleList)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + self.skip(x))


class ListNet(nn.Module):
    """EfficientNet-PyTorch style: blocks in an nn.ModuleList called one by one, a 1x1 pooling layer and a
    swish used twice (after the stem and after the head conv)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(8)
        plan = [(8, 8, 1), (8, 16, 2), (16, 16, 1), (16, 32, 2), (32, 32, 1)]
        self._blocks = nn.ModuleList([Block(*p) for p in plan])
        self._conv_head = nn.Conv2d(32, 48, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(48)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.1)
        self._fc = nn.Linear(48, num_classes)
        self._swish = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = self._swish(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._avg_pooling(x).flatten(1)))


def list_net(num_classes: int = 10) -> nn.Module:
    """The ``module:function`` factory of the ModuleList family."""
    return ListNet(num_classes)


def _convnext(num_classes: int) -> nn.Module:
    cfg = tvm.convnext.CNBlockConfig
    return tvm.convnext.ConvNeXt([cfg(16, 32, 1), cfg(32, 64, 1), cfg(64, None, 1)], num_classes=num_classes)


def _resnext(num_classes: int) -> nn.Module:
    return tvm.resnet.ResNet(tvm.resnet.Bottleneck, [1, 1, 1, 1], num_classes=num_classes, groups=4, width_per_group=4)


def _regnet(num_classes: int) -> nn.Module:
    params = tvm.regnet.BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8)
    return tvm.RegNet(params, num_classes=num_classes, stem_width=8)


def _efficientnet(num_classes: int) -> nn.Module:
    setting, last = tvm.efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return tvm.EfficientNet(setting, 0.2, num_classes=num_classes, last_channel=last)


def _vgg(num_classes: int) -> nn.Module:
    m = tvm.VGG(tvm.vgg.make_layers([8, "M", 16, "M", 32, "M", 32, "M"]), num_classes=num_classes)
    m.classifier = nn.Sequential(  # torchvision's is sized for 512 channels (25088 x 4096)
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, num_classes),
    )
    return m


#: family -> (builder(num_classes), input side)
FAMILIES: dict[str, tuple[Callable[[int], nn.Module], int]] = {
    "resnet": (lambda n: tvm.resnet.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=n), 32),
    "resnext": (_resnext, 32),
    "efficientnet": (_efficientnet, 32),
    "mobilenet_v2": (lambda n: tvm.mobilenet_v2(num_classes=n, width_mult=0.25), 32),
    "mobilenet_v3": (lambda n: tvm.mobilenet_v3_small(num_classes=n, width_mult=0.25), 32),
    "convnext": (_convnext, 32),
    "regnet": (_regnet, 32),
    "densenet": (
        lambda n: tvm.DenseNet(growth_rate=8, block_config=(1, 1, 1, 1), num_init_features=16, num_classes=n),
        32,
    ),
    "vgg": (_vgg, 32),
    "swin": (
        lambda n: tvm.swin_transformer.SwinTransformer(
            patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2], num_classes=n
        ),
        32,
    ),
    "vit": (
        lambda n: tvm.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=n
        ),
        32,
    ),
    "squeezenet": (lambda n: tvm.squeezenet1_1(num_classes=n), 64),
    "modulelist": (list_net, 32),
}


def toy_data(n: int, side: int, n_classes: int = 3, seed: int = 0) -> TensorDataset:
    """``n`` images with a class-coloured square on noise, labels cycling through the classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, side, side, generator=g) * 0.3
    y = torch.arange(n) % n_classes
    q = side // 4
    for i in range(n):
        x[i, int(y[i]) % 3, q : 3 * q, q : 3 * q] = 1.0
    return TensorDataset(x, y)


def tuned_copy(base: nn.Module, n_classes: int, seed: int = 1, scale: float = 0.05) -> nn.Module:
    """A "fine-tuned" copy: a new head for ``n_classes`` and every shared weight nudged by ``scale`` x its std."""
    t = copy.deepcopy(base)
    replace_head(t, n_classes, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * scale * (float(p.std()) + 1e-3))
    return t
