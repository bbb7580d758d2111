"""CKA between the layers of two networks, from one pass over the data or from recorded passes, and read
against chance (a randomly initialised network, a model trained from scratch).

The estimator is :class:`~tunelens.analysis.measures.cka.StreamingCKA` (minibatch CKA, Nguyen, Raghu and
Kornblith 2021). Gram matrices are formed inside the forward hook (:class:`tunelens.core.hooks.ActivationCapture`),
so an in-place ReLU after a layer cannot overwrite what was measured, and modules that fire twice are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn

from tunelens.analysis.measures.activations import FeatureMapExamples, gram_pass, plot_feature_maps
from tunelens.analysis.measures.cka import StreamingCKA
from tunelens.analysis.measures.layers import LayerSpec, resolve_layers
from tunelens.core.models import borrowed, model_device
from tunelens.core.runtime import resolve_device

__all__ = [
    "CKAResult",
    "RecordedPass",
    "cka_against_chance",
    "cka_chance_from_passes",
    "cka_from_passes",
    "cka_matrix",
    "randomly_initialised",
]


class RecordedPass(Protocol):
    """What CKA reads of one model's recorded pass over a loader (the engine's ``ModelPass`` is one): per batch,
    each layer's float64 Gram matrix; the activation statistics; example feature maps."""

    grams: list[dict[str, torch.Tensor]]
    stats: Any
    maps: FeatureMapExamples


@dataclass
class CKAResult:
    """Everything :func:`cka_matrix` measured in its single pass over the data."""

    ab: pd.DataFrame  # A layers x B layers
    aa: pd.DataFrame
    bb: pd.DataFrame
    diagonal: pd.DataFrame  # diagonal pairs with bootstrap CI over batches
    activations: pd.DataFrame  # model, layer, mean, std, frac_zero, n_values
    maps_a: FeatureMapExamples = field(repr=False)
    maps_b: FeatureMapExamples = field(repr=False)
    estimator: str = ""
    n_samples: int = 0
    skipped_samples: int = 0

    def plot_feature_maps(
        self,
        layer: str,
        layer_b: str | None = None,
        k: int = 4,
        labels: tuple[str, str] = ("A", "B"),
        path: str | None = None,
    ):
        """The strongest channels of both models side by side (see :func:`tunelens.analysis.measures.activations.plot_feature_maps`)."""
        return plot_feature_maps(self.maps_a, self.maps_b, layer, layer_b, k=k, labels=labels, path=path)


def cka_matrix(
    base: nn.Module,
    tuned: nn.Module,
    data: Iterable,
    *,
    layers: LayerSpec = "auto",
    layers_tuned: LayerSpec | None = None,
    debiased: bool = True,
    device: str | torch.device | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    n_examples: int = 4,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    names: tuple[str, str] = ("base", "tuned"),
) -> CKAResult:
    """A x B, A x A and B x B minibatch CKA, activation statistics and example feature maps, in one pass.

    Each batch of ``data`` (a loader of ``(inputs, labels[, masks])``) runs once through each model (eval
    mode, no grad; hooks removed and training flags restored afterwards; the caller's models are never moved:
    with ``device`` other than theirs, copies run there; ``None``: the models' own device). ``layers``:
    ``"auto"`` (stage outputs, see :func:`tunelens.analysis.measures.layers.resolve_layers`), exact module names, or
    module types, resolved on both models (``layers_tuned`` for different names in ``tuned``). Under
    ``torch.distributed`` give each rank its own *batches* and call on every rank: the result equals the
    single-process run over all batches. The bootstrap CI of the diagonal resamples batches.
    """
    dev = model_device(base) if device is None else resolve_device(device)
    la = resolve_layers(base, layers)
    lb = resolve_layers(tuned, layers if layers_tuned is None else layers_tuned)
    metric = StreamingCKA(la, lb, debiased=debiased, pairs=pairs)
    with borrowed(base, dev) as model_a, borrowed(tuned, dev) as model_b:
        stats, maps = gram_pass(
            [model_a, model_b], [la, lb], data, dev, lambda g: metric.update_grams(g[0], g[1]), n_examples=n_examples
        )
    return _result(metric, stats, maps, names, n_boot, ci, seed)


def _result(
    metric: StreamingCKA,
    stats: Sequence[Any],
    maps: Sequence[FeatureMapExamples],
    names: tuple[str, str],
    n_boot: int,
    ci: float,
    seed: int,
) -> CKAResult:
    ab, aa, bb = metric.compute_all()
    info = metric.summary()
    diag = metric.bootstrap_diagonal(n_boot=n_boot, ci=ci, seed=seed)
    tables = []
    for st, name, layers in zip(stats, names, metric.layer_lists(), strict=True):
        t = st.table(name)
        tables.append(t[t["layer"].isin(layers)] if "layer" in t else t)
    acts = pd.concat(tables, ignore_index=True)
    return CKAResult(
        ab, aa, bb, diag, acts, maps[0], maps[1], metric.estimator, info["n_samples"], info["skipped_samples"]
    )


def _feed(metric: StreamingCKA, pa: RecordedPass, pb: RecordedPass, la: Sequence[str], lb: Sequence[str]) -> None:
    """Every batch of two recorded passes (the same loader) into ``metric``."""
    if len(pa.grams) != len(pb.grams):
        raise ValueError(f"the two passes saw {len(pa.grams)} and {len(pb.grams)} batches: not the same loader")
    for ga, gb in zip(pa.grams, pb.grams, strict=True):
        metric.update_grams({k: ga[k] for k in la}, {k: gb[k] for k in lb})


def cka_from_passes(
    pa: RecordedPass,
    pb: RecordedPass,
    layers: Sequence[str],
    layers_b: Sequence[str] | None = None,
    *,
    debiased: bool = True,
    pairs: Sequence[tuple[str, str]] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    names: tuple[str, str] = ("base", "tuned"),
) -> CKAResult:
    """:func:`cka_matrix` from two recorded passes (:func:`tunelens.analysis.engine.passes.record_pass` over the same loader),
    without running either model again: the same Grams, hence the same numbers."""
    la, lb = list(layers), list(layers if layers_b is None else layers_b)
    metric = StreamingCKA(la, lb, debiased=debiased, pairs=pairs)
    _feed(metric, pa, pb, la, lb)
    return _result(metric, [pa.stats, pb.stats], [pa.maps, pb.maps], names, n_boot, ci, seed)


def randomly_initialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with random weights: ``reset_parameters()`` on every module that has one (PyTorch's
    default initialisation; BatchNorm gets weight 1, bias 0 and running mean 0 / variance 1, so in eval mode
    it passes activations through unchanged and the copy is a plain random conv/ReLU network). Seeded on the
    CPU, so the global RNG (CPU and CUDA) is left as it was and the result does not depend on the device."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    m = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in m.modules():
            if hasattr(mod, "reset_parameters") and callable(mod.reset_parameters):
                mod.reset_parameters()
    return m.to(dev).eval()


def cka_against_chance(
    base: nn.Module,
    tuned: nn.Module,
    data: Iterable,
    *,
    random_model: nn.Module | None = None,
    scratch: nn.Module | None = None,
    layers: LayerSpec = "auto",
    debiased: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    n_boot: int = 1000,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Per layer: CKA(base, tuned) with a bootstrap CI over batches, next to CKA(base, random weights) and
    CKA(tuned, scratch) when a from-scratch model is given (NaN otherwise), all from one pass.

    Untrained networks already agree strongly (CKA near 1 at the stem, falling with depth), so a drop of
    CKA(base, tuned) with depth only means something relative to these controls. ``random_model`` defaults
    to :func:`randomly_initialised` ``(base, seed)``. Layers are resolved on ``base`` and matched by name.
    Columns: ``layer, cka_base_tuned, ci_low, ci_high, cka_base_random, cka_tuned_scratch, estimator``.
    """
    dev = model_device(base) if device is None else resolve_device(device)
    names = resolve_layers(base, layers)
    rand = random_model if random_model is not None else randomly_initialised(base, seed)
    models = [base, tuned, rand] + ([scratch] if scratch is not None else [])
    lists = [resolve_layers(m, names) for m in models]
    metrics = [StreamingCKA(names, names, debiased=debiased) for _ in range(len(models) - 1)]
    jobs = [(0, 1), (0, 2)] + ([(1, 3)] if scratch is not None else [])

    def sink(g: list[dict[str, torch.Tensor]]) -> None:
        for metric, (i, j) in zip(metrics, jobs, strict=False):
            metric.update_grams(g[i], g[j])

    with ExitStack() as stack:
        used = [stack.enter_context(borrowed(m, dev)) for m in models]
        gram_pass(used, lists, data, dev, sink)
    return _chance_table(metrics, names, scratch is not None, n_boot, ci, seed)


def cka_chance_from_passes(
    base: RecordedPass,
    tuned: RecordedPass,
    random: RecordedPass,
    scratch: RecordedPass | None,
    layers: Sequence[str],
    *,
    debiased: bool = True,
    seed: int = 0,
    n_boot: int = 1000,
    ci: float = 0.95,
) -> pd.DataFrame:
    """:func:`cka_against_chance` from recorded passes of the four models over the same loader."""
    names = list(layers)
    jobs = [(base, tuned), (base, random)] + ([(tuned, scratch)] if scratch is not None else [])
    metrics = [StreamingCKA(names, names, debiased=debiased) for _ in jobs]
    for metric, (pa, pb) in zip(metrics, jobs, strict=True):
        _feed(metric, pa, pb, names, names)
    return _chance_table(metrics, names, scratch is not None, n_boot, ci, seed)


def _chance_table(
    metrics: list[StreamingCKA], names: list[str], scratch: bool, n_boot: int, ci: float, seed: int
) -> pd.DataFrame:
    d_bt = metrics[0].bootstrap_diagonal(n_boot=n_boot, ci=ci, seed=seed).set_index("layer_a")
    ab_br = metrics[1].compute()
    ab_ts = metrics[2].compute() if scratch else None
    df = pd.DataFrame(
        {
            "layer": names,
            "cka_base_tuned": [float(d_bt.loc[n, "cka"]) for n in names],
            "ci_low": [float(d_bt.loc[n, "ci_low"]) for n in names],
            "ci_high": [float(d_bt.loc[n, "ci_high"]) for n in names],
            "cka_base_random": [float(ab_br.loc[n, n]) for n in names],
            "cka_tuned_scratch": [float(ab_ts.loc[n, n]) if ab_ts is not None else float("nan") for n in names],
            "estimator": metrics[0].estimator,
        }
    )
    return df
