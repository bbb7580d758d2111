"""Linear probes per layer: how linearly decodable the target classes are at each depth.

For every layer, the activations (captured with :func:`tunelens.analysis.measures.layers.iterate_features`,
the same mechanism CKA uses) are globally average-pooled to one vector per image,
standardised with the training split's mean and standard deviation, and a multinomial
logistic regression (scikit-learn, L2 penalty ``C``, lbfgs) is fitted on the training split
and scored on the test split (Alain and Bengio 2016, "Understanding intermediate layers
using linear classifier probes"). Run it on the base and the tuned model over the target
task: :func:`probe_gain` shows where fine-tuning made the classes more decodable.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from tunelens.analysis.measures.layers import LayerSpec, iterate_features, resolve_layers
from tunelens.core.runtime import blas_threads, no_tf32, world_size

__all__ = ["fit_probe", "global_pool", "layer_features", "probe_gain", "probe_layers"]


def global_pool(t: torch.Tensor) -> torch.Tensor:
    """One vector per sample: ``(N, C, H, W) -> (N, C)`` (mean over space), ``(N, L, D) -> (N, D)``
    (mean over tokens), ``(N, D)`` as is; other ranks ``(N, C, *) -> (N, C)``.

    Channels-last feature maps (``N, H, W, C``, e.g. Swin) are not recognised.
    """
    if t.ndim == 1:
        return t[:, None]
    if t.ndim == 2:
        return t
    if t.ndim == 3:
        return t.mean(1)
    return t.flatten(2).mean(2)


def gather_array(arr: np.ndarray) -> np.ndarray:
    """``arr`` concatenated over the ranks of ``torch.distributed`` in rank order (itself in one process)."""
    if world_size() <= 1:
        return arr
    import torch.distributed as dist

    parts: list = [None] * world_size()
    dist.all_gather_object(parts, arr)
    return np.concatenate(parts)


def layer_features(
    model: nn.Module, loader: Iterable, layers: Sequence[str], device: torch.device | str | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Globally pooled features ``{layer: (N, D) float64}`` and the labels ``(N,)`` over ``loader``.

    Under ``torch.distributed`` every rank receives the features of all ranks.
    """
    if device is None:
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    labels: list[torch.Tensor] = []
    with no_tf32():
        for f, y, _ in iterate_features(model, loader, layers, device):
            if y is None:
                raise ValueError("probing needs labelled batches: (inputs, labels[, masks])")
            for name in layers:
                feats[name].append(global_pool(f[name]).float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    if not labels:
        raise ValueError("the loader yielded no batch")
    out = {name: gather_array(torch.cat(v).double().numpy()) for name, v in feats.items()}
    return out, gather_array(torch.cat(labels).numpy())


def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 1000,
    random_state: int = 0,
) -> dict[str, float]:
    """Standardise (fit on train), fit ``LogisticRegression(C, max_iter, random_state)``; train and test accuracy.

    Returns ``train_acc``, ``test_acc`` (fractions) and ``n_iter`` (lbfgs iterations; equal
    to ``max_iter`` when it stopped before converging).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        raise ValueError("a probe needs at least two classes in the training split")
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=random_state)
    with warnings.catch_warnings(), blas_threads(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(x_train), y_train)
    return {
        "train_acc": float(clf.score(scaler.transform(x_train), y_train)),
        "test_acc": float(clf.score(scaler.transform(x_test), y_test)),
        "n_iter": int(np.max(clf.n_iter_)),
    }


def probe_layers(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable | None,
    layers: LayerSpec = "auto",
    *,
    name: str | None = None,
    C: float = 1.0,
    max_iter: int = 1000,
    random_state: int = 0,
    device: torch.device | str | None = None,
    test_features: tuple[dict[str, np.ndarray], np.ndarray] | None = None,
) -> pd.DataFrame:
    """Test accuracy of a linear probe on each layer's pooled, standardised features.

    ``layers`` as in :func:`tunelens.analysis.measures.layers.resolve_layers` (``"auto"``: for a ResNet the stem
    output, ``layer1`` .. ``layer4``, ``avgpool`` and ``fc``). Deterministic for a given
    ``random_state`` and loader order.

    Columns: ``model`` (``name`` or the class name), ``layer``, ``depth`` (0-based position
    in forward order), ``n_features``, ``n_train``, ``n_test``, ``train_acc``, ``test_acc``,
    ``chance`` (``1 / K`` for the ``K`` classes in the training split), ``n_iter``.
    ``test_features``: the test split's pooled features and labels when a pass already made them
    (``({layer: (N, D)}, labels)``, :meth:`tunelens.analysis.engine.passes.ModelPass.features`); ``test_loader`` is then unused.
    """
    names = resolve_layers(model, layers)
    xtr, ytr = layer_features(model, train_loader, names, device)
    if (
        test_features is not None
    ):  # already pooled by a shared pass (:meth:`tunelens.analysis.engine.passes.ModelPass.features`)
        xte, yte = {n: test_features[0][n] for n in names}, test_features[1]
    elif test_loader is not None:
        xte, yte = layer_features(model, test_loader, names, device)
    else:
        raise ValueError("probe_layers needs test_loader or test_features")
    chance = 1.0 / len(np.unique(ytr))
    rows = []
    for depth, layer in enumerate(names):
        r = fit_probe(xtr[layer], ytr, xte[layer], yte, C=C, max_iter=max_iter, random_state=random_state)
        rows.append(
            {
                "model": name or type(model).__name__,
                "layer": layer,
                "depth": depth,
                "n_features": int(xtr[layer].shape[1]),
                "n_train": len(ytr),
                "n_test": len(yte),
                **r,
                "chance": chance,
            }
        )
    cols = ["model", "layer", "depth", "n_features", "n_train", "n_test", "train_acc", "test_acc", "chance", "n_iter"]
    return pd.DataFrame(rows)[cols]


def probe_gain(base: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    """Per layer (matched by name): ``base_test_acc``, ``tuned_test_acc`` and ``gain`` in percentage points
    (``100 * (tuned - base)``), in the tuned table's order."""
    m = tuned[["layer", "depth", "test_acc"]].merge(
        base[["layer", "test_acc"]], on="layer", suffixes=("_tuned", "_base")
    )
    out = pd.DataFrame(
        {
            "layer": m["layer"],
            "depth": m["depth"],
            "base_test_acc": m["test_acc_base"],
            "tuned_test_acc": m["test_acc_tuned"],
        }
    )
    out["gain"] = 100.0 * (out["tuned_test_acc"] - out["base_test_acc"])
    return out.reset_index(drop=True)
