"""Getting a model ready for attribution, and the two model variants the attribution study needs.

* :func:`prepare_for_attribution` returns a *copy* of a model that gradient- and
  hook-based attribution methods can trust: eval mode (BatchNorm in train mode makes
  the maps depend on the batch, e.g. on Integrated Gradients' internal batch size),
  no in-place activations (Captum's backward hooks refuse to run on them, or see
  overwritten tensors), and a separate ReLU module for every ReLU *use* in
  torchvision's ``BasicBlock``/``Bottleneck`` (both apply ``self.relu`` twice or three
  times, so module-hook methods such as DeepLift or guided backprop would treat two
  different points of the network as one; Ancona et al. 2018, Captum issue #378).
  The copy's logits are checked against the original's; a mismatch is an error.
* :func:`randomize_cascading` gives the "floor" model of the model-randomization
  sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): weights
  re-initialised stage by stage from the top (head first).
* the linear-probe head for a model whose head answers another task is
  :mod:`tunelens.analysis.measures.attribution.probe_head`.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from tunelens.core.models import model_device

__all__ = [
    "LogitMismatchError",
    "SplitReLUBasicBlock",
    "SplitReLUBottleneck",
    "assert_eval",
    "cascade_stages",
    "eval_mode",
    "is_prepared",
    "is_residual",
    "mark_prepared",
    "output_dim",
    "prepare_for_attribution",
    "randomize_cascading",
    "reused_modules",
]

_PREPARED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the copies this module made


class LogitMismatchError(RuntimeError):
    """The prepared copy of a model does not compute the original's logits."""


class SplitReLUBasicBlock(BasicBlock):
    """torchvision ``BasicBlock`` with one ReLU module per use (``relu1`` after ``bn1``, ``relu2`` after the add).

    Same computation as ``BasicBlock.forward``; the residual add is out of place.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu2(out + identity)


class SplitReLUBottleneck(Bottleneck):
    """torchvision ``Bottleneck`` with ``relu1``, ``relu2``, ``relu3`` instead of one ``relu`` used three times."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu3(out + identity)


def _split_block(block: nn.Module) -> None:
    """Turn a (copied) BasicBlock/Bottleneck into its split-ReLU subclass, in place; names elsewhere unchanged."""
    if type(block) is BasicBlock:
        block.__class__ = SplitReLUBasicBlock
        uses = 2
    elif type(block) is Bottleneck:
        block.__class__ = SplitReLUBottleneck
        uses = 3
    else:  # subclasses of torchvision's blocks may have their own forward: leave them
        return
    for i in range(1, uses + 1):
        setattr(block, f"relu{i}", nn.ReLU(inplace=False))
    del block.relu


def is_prepared(model: nn.Module) -> bool:
    """True for a model returned by :func:`prepare_for_attribution`."""
    return model in _PREPARED


def mark_prepared(model: nn.Module) -> None:
    """Record ``model`` as ready for attribution (a copy made here or by the probe head): :func:`is_prepared`."""
    _PREPARED.add(model)


def assert_eval(model: nn.Module) -> None:
    """Raise unless every module of ``model`` is in eval mode."""
    training = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"attribution needs eval mode, but {len(training)} module(s) are in train mode "
            f"(first: {training[0]!r}); BatchNorm in train mode makes the maps depend on the batch"
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside; each module's own mode restored after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with eval_mode(model):
        out = model(x.to(model_device(model)))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; attribution needs a tensor of logits")
    return out.detach().float()


def reused_modules(
    model: nn.Module,
    inputs: torch.Tensor,
    types: tuple[type[nn.Module], ...] = (
        nn.ReLU,
        nn.ReLU6,
        nn.LeakyReLU,
        nn.ELU,
        nn.GELU,
        nn.SiLU,
        nn.Sigmoid,
        nn.Tanh,
        nn.Softplus,
        nn.Hardswish,
    ),
) -> dict[str, int]:
    """Activation modules that run more than once in one forward pass: ``{name: calls}``."""
    counts: dict[str, int] = {}
    handles = []

    def hook(name):
        def f(*_):
            counts[name] = counts.get(name, 0) + 1

        return f

    try:
        for n, mod in model.named_modules():
            if isinstance(mod, types):
                handles.append(mod.register_forward_hook(hook(n)))
        _logits(model, inputs[:1])
    finally:
        for h in handles:
            h.remove()
    return {n: c for n, c in counts.items() if c > 1}


def is_residual(model: nn.Module) -> bool:
    """True when the model has residual blocks: torchvision ResNet blocks, or a module whose class name says
    ResNet, ResNeXt or residual."""
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            return True
        name = type(m).__name__.lower()
        if "resnet" in name or "resnext" in name or "residual" in name:
            return True
    return False


def _looks_like_probabilities(out: torch.Tensor) -> bool:
    if out.ndim != 2 or out.shape[1] < 2:
        return False
    return bool((out >= 0).all() and (out <= 1).all() and torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-4))


def prepare_for_attribution(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    n_check: int = 8,
) -> nn.Module:
    """A copy of ``model`` made safe for attribution, with its logits checked against the original's.

    On a deep copy: every module in eval mode; every module with an ``inplace`` flag
    (ReLU, ReLU6, Hardtanh, SiLU, Dropout ...) set to out-of-place; torchvision
    ``BasicBlock``/``Bottleneck`` re-classed to :class:`SplitReLUBasicBlock` /
    :class:`SplitReLUBottleneck` (same parameters and module names, one ReLU per use).
    The copy's logits on up to ``n_check`` of ``inputs`` must match the original's (eval
    mode) within ``rtol``/``atol`` times the logit scale, else :class:`LogitMismatchError`.
    A model whose outputs look like probabilities is refused: attribute logits, not softmax.
    Activation modules still used twice (custom blocks) are reported with a warning
    (:func:`reused_modules` lists them).

    An already prepared model is returned as is (a copy moved to ``device`` when it lives elsewhere).
    """
    if is_prepared(model):
        if device is None or torch.device(device) == model_device(model):
            return model
        moved = copy.deepcopy(model).to(device)
        _PREPARED.add(moved)
        return moved
    dev = torch.device(device) if device is not None else model_device(model)
    x = inputs[:n_check].detach()
    ref = _logits(model, x)
    if _looks_like_probabilities(ref):
        raise ValueError(
            "the model's outputs are probabilities (non-negative rows summing to 1): attribute the "
            "logits instead (remove the final softmax); gradients of saturated probabilities mislead"
        )
    prepared = copy.deepcopy(model).to(dev)
    prepared.eval()
    for m in list(prepared.modules()):
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
        _split_block(m)
    prepared.eval()  # the new ReLU modules too
    for p in prepared.parameters():
        p.requires_grad_(False)
    got = _logits(prepared, x).to(ref.device)
    scale = float(ref.abs().max().clamp_min(1.0))
    if got.shape != ref.shape or not torch.allclose(got, ref, rtol=rtol, atol=atol * scale):
        diff = (got - ref).abs().max().item() if got.shape == ref.shape else float("nan")
        raise LogitMismatchError(
            f"preparing {type(model).__name__} for attribution changed its logits "
            f"(max abs difference {diff:.3g}); refusing to attribute a different function"
        )
    reused = reused_modules(prepared, x)
    if reused:
        warnings.warn(
            f"activation module(s) used more than once per forward pass: {sorted(reused)}; module-hook "
            "methods (guided backprop, DeepLift) treat their uses as one",
            stacklevel=2,
        )
    _PREPARED.add(prepared)
    return prepared


def output_dim(model: nn.Module, inputs: torch.Tensor) -> int:
    """Number of logits the model returns for one input."""
    return int(_logits(model, inputs[:1]).shape[-1])


# ----------------------------------------------------------------------------------------------
# Model randomization (the floor)
# ----------------------------------------------------------------------------------------------


def cascade_stages(model: nn.Module) -> list[str]:
    """Top-level stages holding parameters, from the top (head) down: the order of cascading randomization."""
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())][::-1]


@torch.no_grad()
def reinit(module: nn.Module, gen: torch.Generator) -> None:
    """Re-initialise the convolutions, linear layers and norms under ``module`` from ``gen`` (the randomization test's cascade)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                rm.zero_()
                rv.fill_(1.0)
        else:
            for p in m.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def randomize_cascading(model: nn.Module, n_stages: int | None = None, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with its top ``n_stages`` stages re-initialised (all when None), head first.

    Cascading model-parameter randomization (Adebayo et al. 2018): stages are taken from
    :func:`cascade_stages` (for ResNets ``fc``, ``layer4`` .. ``layer1``, ``bn1``, ``conv1``).
    Convolutions and linear layers get He-normal weights (std ``sqrt(2 / fan_in)``) and zero
    biases, normalisation layers identity affine parameters and reset running statistics,
    any other parameter N(0, 0.02). Deterministic from ``seed``. The copy keeps the
    original's preparation state and mode.
    """
    out = copy.deepcopy(model)
    stages = cascade_stages(out)
    k = len(stages) if n_stages is None else n_stages
    if not 0 <= k <= len(stages):
        raise ValueError(f"n_stages must be in 0..{len(stages)} for this model, got {n_stages}")
    gen = torch.Generator().manual_seed(int(seed))
    for name in stages[:k]:
        reinit(out.get_submodule(name), gen)
    return out
