"""A linear-probe head (logistic regression on the pooled penultimate features) attached to a copy of a model
whose head answers another task, so it can be attributed for the target classes (:func:`fit_probe_head`)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from tunelens.analysis.measures.attribution.prepare import eval_mode, is_prepared, mark_prepared
from tunelens.core.evaluation import unpack_batch
from tunelens.core.models import model_device
from tunelens.core.runtime import blas_threads

__all__ = ["fit_probe_head", "head_features"]


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
        with eval_mode(model):
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
        mark_prepared(out)
    info = {
        "train_acc": float(clf.score((feats - mu) / sd, y)),
        "n_train": int(len(y)),
        "n_features": int(feats.shape[1]),
        "C": C,
        "head": name,
    }
    return out, info
