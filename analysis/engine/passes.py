"""One forward pass per model over the test data, shared by every analysis of a run.

:func:`record_pass` runs a loader once through a model (eval mode, no grad, TF32 off; the caller's model is
never moved, see :func:`tunelens.core.models.borrowed`) and keeps, per batch, everything the analyses read
from a plain pass:

* each layer's float64 Gram matrix ``X X^T`` (CKA: :func:`tunelens.analysis.measures.cka_models.cka_from_passes`; the minibatch
  estimator needs nothing else, Nguyen, Raghu and Kornblith 2021),
* each layer's activation statistics and the feature maps of a few example images,
* the model's outputs (logits) and the labels (evaluation: predictions, losses, accuracy),
* each layer's globally pooled features (linear probes, :func:`tunelens.analysis.measures.probes.probe_layers`).

:class:`PassCache` holds one :class:`ModelPass` per model for a run: the evaluation, CKA (every tuned model
against the base, the random-weights and from-scratch controls), the probes' test features and the rewind
reference all read the same pass, and the base model's pass serves every tuned model. Memory per model:
``L`` Grams of ``b x b`` float64 per batch of ``b``, the logits, and ``N x sum(channels)`` pooled float32
features; never a feature map beyond the example images.

The numbers equal those of separate passes: every model sees the same batches in the same order, and each
quantity is computed from the layer's output inside the forward hook exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tunelens.analysis.engine.sharding import batch_offsets
from tunelens.analysis.measures.activations import ActivationStats, FeatureMapExamples, gram_pass
from tunelens.analysis.measures.probes import gather_array, global_pool
from tunelens.core.evaluation import unpack_batch
from tunelens.core.models import borrowed
from tunelens.core.runtime import all_reduce_sum, resolve_device

__all__ = ["ModelPass", "PassCache", "record_pass"]


@dataclass
class ModelPass:
    """What one model's pass over a loader left behind (see the module docstring). Under ``torch.distributed``
    with a sharded loader each rank holds its own batches; :meth:`features`, :meth:`targets` gather them and
    :meth:`metrics` reduces across ranks (collectives: call them on every rank)."""

    layers: list[str]
    grams: list[dict[str, torch.Tensor]]
    stats: ActivationStats
    maps: FeatureMapExamples
    logits: list[torch.Tensor]  # per batch, float32 on the CPU
    labels: list[torch.Tensor | None]
    pooled: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per layer, per batch, float32 CPU
    offsets: list[int] | None = None  # the batches' starts in single-process order (sharded loaders)

    @property
    def n_samples(self) -> int:
        return int(sum(len(t) for t in self.logits))

    def indices(self) -> np.ndarray:
        """Each of this rank's rows' position in the single-process sample order."""
        out, start = [], 0
        for b, t in enumerate(self.logits):
            start = self.offsets[b] if self.offsets is not None else start
            out.append(np.arange(start, start + len(t)))
            start += len(t)
        return np.concatenate(out) if out else np.zeros(0, dtype=int)

    def _labels(self) -> torch.Tensor:
        if any(y is None for y in self.labels):
            raise ValueError("this needs labelled batches: (inputs, labels[, masks])")
        return torch.cat([torch.as_tensor(y) for y in self.labels if y is not None]).long()

    def features(self, layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Globally pooled features ``{layer: (N, D) float64}`` of every rank, in sample order (as
        :func:`tunelens.analysis.measures.probes.layer_features` returns them)."""
        missing = [n for n in layers if n not in self.pooled]
        if missing:
            raise KeyError(f"the pass kept no pooled features of {missing}; it recorded {sorted(self.pooled)}")
        return {n: gather_array(torch.cat(self.pooled[n]).double().numpy()) for n in layers}

    def targets(self) -> np.ndarray:
        """The labels of every rank, in sample order."""
        return gather_array(self._labels().numpy())

    def metrics(self, subset: Sequence[int] | None = None) -> dict[str, float]:
        """``{"acc", "loss", "n"}`` as :func:`tunelens.core.evaluation.evaluate` gives them (accuracy, mean
        cross-entropy), over every sample or the single-process positions in ``subset``."""
        dev = next(iter(self.grams[0].values())).device if self.grams and self.grams[0] else torch.device("cpu")
        keep = None if subset is None else set(np.asarray(subset, dtype=int).tolist())
        tot = torch.zeros(3, dtype=torch.float64)
        ys, pos = self._labels(), self.indices()
        start = 0
        for out in self.logits:  # per batch, summed as evaluate() sums them
            y, idx = ys[start : start + len(out)], pos[start : start + len(out)]
            start += len(out)
            if keep is not None:
                sel = torch.tensor([int(i) in keep for i in idx], dtype=torch.bool)
                out, y = out[sel], y[sel]
            tot[0] += (out.argmax(1) == y).sum()
            tot[1] += F.cross_entropy(out, y, reduction="sum").double()
            tot[2] += len(y)
        tot = all_reduce_sum(tot.to(dev)).cpu()  # on the Grams' device: NCCL reduces CUDA tensors only
        n = max(tot[2].item(), 1)
        return {"acc": tot[0].item() / n, "loss": tot[1].item() / n, "n": int(tot[2].item())}


def record_pass(
    model: nn.Module,
    loader: Iterable,
    layers: Sequence[str],
    device: torch.device | str,
    *,
    n_examples: int = 4,
    pooled: bool = True,
) -> ModelPass:
    """Run ``loader`` once through ``model`` and keep what :class:`ModelPass` holds (``pooled``: the layers'
    pooled features too)."""
    dev = resolve_device(device)
    names = list(layers)
    grams: list[dict[str, torch.Tensor]] = []
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor | None] = []
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in names} if pooled else {}

    def on_layer(_slot: int, name: str, out: torch.Tensor) -> None:
        if pooled:
            feats[name].append(global_pool(out).float().cpu())

    def on_output(_slot: int, out: Any, batch: Any) -> None:
        logits.append(out.detach().float().cpu())
        labels.append(unpack_batch(batch)[1])

    with borrowed(model, dev) as m:
        stats, maps = gram_pass(
            [m], [names], loader, dev, lambda g: grams.append(dict(g[0])), n_examples, on_layer, on_output
        )
    return ModelPass(names, grams, stats[0], maps[0], logits, labels, feats, batch_offsets(loader))


class PassCache:
    """One :class:`ModelPass` per model over one loader, made on first use (``layers``, ``device`` and the
    example count fixed for the run). Models are held by reference, so a model's pass is never mistaken for
    another's."""

    def __init__(self, loader: Iterable, layers: Sequence[str], device: torch.device | str, n_examples: int = 4):
        self.loader, self.layers, self.device, self.n_examples = loader, list(layers), device, n_examples
        self._passes: list[tuple[nn.Module, ModelPass]] = []

    def get(self, model: nn.Module, keep: bool = True) -> ModelPass:
        """``model``'s pass (recorded now if it was not yet; ``keep=False``: not kept for later)."""
        for m, p in self._passes:
            if m is model:
                return p
        p = record_pass(model, self.loader, self.layers, self.device, n_examples=self.n_examples)
        if keep:
            self._passes.append((model, p))
        return p

    def __contains__(self, model: nn.Module) -> bool:
        return any(m is model for m, _ in self._passes)
