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
* :func:`fit_probe_head` attaches a linear-probe head (logistic regression on the
  pooled penultimate features) so a model whose head answers another task can be
  attributed for the target classes.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from tunelens.core.evaluation import unpack_batch
from tunelens.core.models import model_device
from tunelens.core.runtime import blas_threads

__all__ = [
    "LogitMismatchError",
    "SplitReLUBasicBlock",
    "SplitReLUBottleneck",
    "assert_eval",
    "cascade_stages",
    "fit_probe_head",
    "head_features",
    "is_prepared",
    "is_residual",
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


def assert_eval(model: nn.Module) -> None:
    """Raise unless every module of ``model`` is in eval mode."""
    training = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"attribution needs eval mode, but {len(training)} module(s) are in train mode "
            f"(first: {training[0]!r}); BatchNorm in train mode makes the maps depend on the batch"
        )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
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
    with _eval_mode(model):
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


# ----------------------------------------------------------------------------------------------
# Linear-probe head (models whose head answers another task)
# ----------------------------------------------------------------------------------------------


def _iter_batches(data: Any, batch_size: int = 256) -> Iterable:
    if isinstance(data, torch.utils.data.Dataset):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, (tuple, list)) and len(data) >= 2 and isinstance(data[0], torch.Tensor):
        return [tuple(data)]
    return data


@torch.no_grad()
def head_features(
    model: nn.Module, data: Any, max_samples: int | None = None, device: torch.device | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled penultimate features (the input of the classification head, flattened) and labels.

    ``data``: a dataset or loader yielding ``(x, y[, mask])``, or an ``(x, y)`` pair of tensors.
    """
    from tunelens.core.naming import head_name

    head = model.get_submodule(head_name(model))
    dev = torch.device(device) if device is not None else model_device(model)
    feats, labels, seen = [], [], 0
    captured: list[torch.Tensor] = []

    def grab(_m: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if isinstance(head, nn.Conv2d) and x.ndim == 4:  # a 1x1 conv head (SqueezeNet): its input, averaged
            x = x.mean((2, 3))
        captured.append(x.flatten(1).float().cpu())

    h = head.register_forward_pre_hook(grab)
    try:
        with _eval_mode(model):
            for batch in _iter_batches(data):
                x, y, _ = unpack_batch(batch)
                if y is None:
                    raise ValueError("fitting a probe head needs labelled data: (inputs, labels) batches")
                captured.clear()
                model(x.to(dev))
                feats.append(captured[-1])
                labels.append(torch.as_tensor(y).cpu())
                seen += len(y)
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        h.remove()
    fa, ya = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    if max_samples is not None:
        fa, ya = fa[:max_samples], ya[:max_samples]
    return fa, ya


def fit_probe_head(
    model: nn.Module,
    data: Any,
    num_classes: int | None = None,
    *,
    C: float = 1.0,
    max_samples: int | None = 4000,
    device: torch.device | str | None = None,
    max_iter: int = 2000,
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` whose head is a linear probe for the classes of ``data``.

    Logistic regression (scikit-learn, L2, ``C``) on standardised pooled penultimate
    features (Alain & Bengio 2016; Kornblith et al. 2019), folded back into one
    ``nn.Linear`` (a 1x1 ``nn.Conv2d`` for SqueezeNet's conv head, whose following ReLU is then
    dropped, on the spatially averaged features) so the copy maps images to probe logits and can
    be attributed like any classifier. Returns ``(model_copy, info)`` with the probe's training accuracy and size.
    """
    from sklearn.linear_model import LogisticRegression

    from tunelens.core.naming import head_name

    feats, y = head_features(model, data, max_samples=max_samples, device=device)
    classes = np.unique(y)
    n_cls = int(num_classes) if num_classes is not None else int(classes.max()) + 1
    if len(classes) < 2:
        raise ValueError("a probe head needs labelled data from at least two classes")
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=max_iter)
    with blas_threads(1):
        clf.fit((feats - mu) / sd, y)
    coef, icpt = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: logits (-z/2, z/2), the same probabilities as (0, z), and both logits
        # depend on the input (a constant class-0 logit would have zero gradient: empty attributions for class 0)
        coef = np.concatenate([-coef / 2, coef / 2])
        icpt = np.concatenate([-icpt / 2, icpt / 2])
    w = np.zeros((n_cls, feats.shape[1]), dtype=np.float64)
    b = np.full(n_cls, -1e4, dtype=np.float64)  # classes absent from the probe's data never win
    w[clf.classes_] = coef / sd
    b[clf.classes_] = icpt - (coef * (mu / sd)).sum(1)
    out = copy.deepcopy(model)
    name = head_name(out)
    old = out.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    parent = out.get_submodule(parent_name) if parent_name else out
    lin: nn.Linear | nn.Conv2d
    if isinstance(old, nn.Linear):
        lin = nn.Linear(feats.shape[1], n_cls)
    elif isinstance(old, nn.Conv2d) and old.kernel_size == (1, 1) and isinstance(parent, nn.Sequential):
        # SqueezeNet: conv 1x1 -> ReLU -> average pool. The probe is a 1x1 conv and the ReLU after it is dropped,
        # so the head computes mean_xy(W x + b) = W mean_xy(x) + b: exactly the probe on the pooled features
        lin = nn.Conv2d(feats.shape[1], n_cls, 1)
        w = w[:, :, None, None]
        after = list(parent._modules)[list(parent._modules).index(child) + 1 :]
        for k in after:
            if isinstance(parent._modules[k], nn.ReLU):
                parent._modules[k] = nn.Identity().train(old.training)
    else:
        raise ValueError(
            f"probe heads replace an nn.Linear head or a 1x1 nn.Conv2d head in an nn.Sequential; {name!r} is a "
            f"{type(old).__name__}"
        )
    lin = lin.to(device=old.weight.device, dtype=old.weight.dtype)
    bias = lin.bias
    assert bias is not None  # both probe heads are built with a bias
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        bias.copy_(torch.from_numpy(b))
    setattr(parent, child, lin)
    lin.train(old.training)
    if is_prepared(model):
        lin.weight.requires_grad_(False)
        bias.requires_grad_(False)
        _PREPARED.add(out)
    info = {
        "train_acc": float(clf.score((feats - mu) / sd, y)),
        "n_train": int(len(y)),
        "n_features": int(feats.shape[1]),
        "C": C,
        "head": name,
    }
    return out, info
