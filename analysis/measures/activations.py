"""Activation statistics and feature-map snapshots, gathered inside the same hooks that form CKA Gram matrices.

Two accumulators fed by :func:`tunelens.analysis.measures.cka_models.cka_matrix` (one per model):

* :class:`ActivationStats` -- per layer, the mean and standard deviation of every activation value and
  the fraction of exact zeros (for post-ReLU outputs: the fraction of units switched off). Batch moments
  are merged with Chan, Golub and LeVeque's (1979) parallel update in float64, so nothing grows with the
  number of samples and per-rank results merge exactly under ``torch.distributed``.
* :class:`FeatureMapExamples` -- the full feature maps of a few example images (first images of the first
  batch), from which :meth:`FeatureMapExamples.strongest` picks each image's strongest channels;
  :func:`plot_feature_maps` shows two models side by side.

:func:`gram_pass` runs the data once through several models and, inside each forward hook, forms the
float64 Gram matrix that CKA needs and feeds both accumulators.

All of them see a layer's output inside the forward hook, before any later in-place operation (torchvision's
``ReLU(inplace=True)``) can change it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tunelens.core.evaluation import unpack_batch
from tunelens.core.hooks import ActivationCapture
from tunelens.core.models import eval_mode
from tunelens.core.runtime import blas_threads, no_tf32

__all__ = ["ActivationStats", "FeatureMapExamples", "gram_pass", "plot_feature_maps"]


class ActivationStats:
    """Streaming mean, standard deviation and fraction of zeros of each layer's activations.

    ``update(name, out)`` takes a layer's output for one batch (any shape). Per batch,
    ``m_b = sum(x) / c_b`` and ``M2_b = sum(x^2) - c_b m_b^2`` (float64), merged as
    ``M2 = M2_1 + M2_2 + delta^2 c_1 c_2 / (c_1 + c_2)`` (Chan et al. 1979). ``std`` is the
    population standard deviation over all values of the layer (samples x units).
    Accumulators stay on the tensor's device (no host sync per batch).
    """

    def __init__(self) -> None:
        self._acc: dict[str, list[Any]] = {}  # name -> [count, mean, m2, zeros]

    def reset(self) -> None:
        self._acc.clear()

    def update(
        self, name: str, out: torch.Tensor, x64: torch.Tensor | None = None, sumsq: torch.Tensor | None = None
    ) -> None:
        """Add one batch. ``x64`` (the float64 copy) and ``sumsq`` (``trace`` of the Gram) are reused if given."""
        c = out.numel()
        if c == 0:
            return
        x64 = out.detach().to(torch.float64) if x64 is None else x64
        s = x64.sum()
        ss = (x64 * x64).sum() if sumsq is None else sumsq
        # torch.count_nonzero is ~20x slower on CPU than summing the tensor cast to bool
        zeros = c - out.detach().bool().sum(dtype=torch.int32 if c < 2**31 else torch.int64)
        mean_b = s / c
        m2_b = ss - s * mean_b
        if name not in self._acc:
            self._acc[name] = [c, mean_b, m2_b, zeros]
            return
        n0, mean0, m20, z0 = self._acc[name]
        n = n0 + c
        delta = mean_b - mean0
        self._acc[name] = [n, mean0 + delta * (c / n), m20 + m2_b + delta * delta * (n0 * c / n), z0 + zeros]

    def state(self) -> dict[str, tuple[int, float, float, int]]:
        """``{layer: (count, mean, M2, zeros)}`` as Python numbers."""
        return {k: (int(n), float(m), float(m2), int(round(float(z)))) for k, (n, m, m2, z) in self._acc.items()}

    def merged_state(self) -> dict[str, tuple[int, float, float, int]]:
        """:meth:`state` merged over all ranks when ``torch.distributed`` is initialised."""
        st = self.state()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return st
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, st)
        out: dict[str, tuple[int, float, float, int]] = {}
        for part in parts:
            for k, (n1, m1, a1, z1) in part.items():
                if k not in out:
                    out[k] = (n1, m1, a1, z1)
                    continue
                n0, m0, a0, z0 = out[k]
                n = n0 + n1
                d = m1 - m0
                out[k] = (n, m0 + d * n1 / n, a0 + a1 + d * d * n0 * n1 / n, z0 + z1)
        return out

    def table(self, model: str = "") -> pd.DataFrame:
        """One row per layer: ``model, layer, mean, std, frac_zero, n_values`` (collective when distributed)."""
        rows = []
        for k, (n, m, m2, z) in self.merged_state().items():
            rows.append(
                {
                    "model": model,
                    "layer": k,
                    "mean": m,
                    "std": float(np.sqrt(max(m2, 0.0) / n)),
                    "frac_zero": z / n,
                    "n_values": n,
                }
            )
        return pd.DataFrame(rows, columns=["model", "layer", "mean", "std", "frac_zero", "n_values"])


@dataclass
class FeatureMapExamples:
    """Feature maps of the first ``n_examples`` images, for every captured 4-D (N, C, H, W) layer output.

    Filled from the first batch only (copies, float32, on the CPU); non-spatial layers are ignored.
    """

    n_examples: int = 4
    images: np.ndarray | None = None
    maps: dict[str, np.ndarray] = field(default_factory=dict)

    def add_images(self, x: torch.Tensor) -> None:
        if self.images is None and self.n_examples > 0:
            self.images = x[: self.n_examples].detach().float().cpu().numpy().copy()

    def update(self, name: str, out: torch.Tensor) -> None:
        if self.n_examples <= 0 or name in self.maps or out.dim() != 4:
            return
        self.maps[name] = out[: self.n_examples].detach().float().cpu().numpy().copy()

    def strengths(self, layer: str) -> np.ndarray:
        """Mean activation of each channel per image, ``(n_examples, C)``."""
        return self.maps[layer].mean(axis=(2, 3))

    def strongest(
        self, layer: str, k: int = 4, reference: FeatureMapExamples | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(channels (n, k), maps (n, k, H, W))``: each image's ``k`` channels of largest mean activation.

        With ``reference`` (the other model) holding the same layer with the same channel count, its
        channel choice is used, so the same channels of both models appear side by side.
        """
        src = self
        if (
            reference is not None
            and layer in reference.maps
            and reference.maps[layer].shape[1] == self.maps[layer].shape[1]
        ):
            src = reference
        k = min(k, self.maps[layer].shape[1])
        ch = np.argsort(-src.strengths(layer), axis=1, kind="stable")[:, :k]
        m = np.take_along_axis(self.maps[layer], ch[:, :, None, None], axis=1)
        return ch, m


def plot_feature_maps(
    maps_a: FeatureMapExamples,
    maps_b: FeatureMapExamples,
    layer: str,
    layer_b: str | None = None,
    k: int = 4,
    labels: tuple[str, str] = ("A", "B"),
    path: str | None = None,
):
    """Figure: per example image (rows), the input, then model A's ``k`` strongest channels of ``layer``,
    then the same channels (or B's own strongest when widths differ) of model B at ``layer_b``."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    layer_b = layer_b or layer
    ch_a, ma = maps_a.strongest(layer, k)
    ref = maps_a if layer_b == layer else None
    ch_b, mb = maps_b.strongest(layer_b, k, reference=ref)
    n = ma.shape[0]
    cols = 1 + ma.shape[1] + mb.shape[1]
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n), squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        if maps_a.images is not None:
            img = maps_a.images[i]
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
            ax.imshow(np.transpose(img, (1, 2, 0)) if img.shape[0] in (3, 4) else img[0], cmap="gray")
        ax.set_axis_off()
        for j in range(ma.shape[1]):
            axes[i, 1 + j].imshow(ma[i, j], cmap="magma")
            axes[i, 1 + j].set_title(f"{labels[0]} c{ch_a[i, j]}", fontsize=7)
            axes[i, 1 + j].set_axis_off()
        for j in range(mb.shape[1]):
            ax = axes[i, 1 + ma.shape[1] + j]
            ax.imshow(mb[i, j], cmap="magma")
            ax.set_title(f"{labels[1]} c{ch_b[i, j]}", fontsize=7)
            ax.set_axis_off()
    fig.suptitle(f"strongest channels: {labels[0]}:{layer} | {labels[1]}:{layer_b}", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def _gram64(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T`` for a float64 (n, d) matrix. On the CPU numpy's BLAS (OpenBLAS in the wheels) is used:
    for these short, wide products it is ~1.3x faster than torch's MKL call (same float64 arithmetic). The pass
    runs it on one BLAS thread: next to one busy process on a 2-core machine a (360, 8192) product took 0.035 s on
    one thread and 0.26 s on two (OpenBLAS threads spin-wait); idle, two threads gain at most 2x."""
    if x.device.type == "cpu" and x.dtype == torch.float64:
        xn = x.numpy()
        return torch.from_numpy(xn @ xn.T)
    return x @ x.T


def gram_pass(
    models: Sequence[nn.Module],
    layer_lists: Sequence[list[str]],
    loader: Iterable,
    device: torch.device,
    sink: Callable[[list[dict[str, torch.Tensor]]], None],
    n_examples: int = 0,
    on_layer: Callable[[int, str, torch.Tensor], None] | None = None,
    on_output: Callable[[int, Any, Any], None] | None = None,
) -> tuple[list[ActivationStats], list[FeatureMapExamples]]:
    """Run every batch of ``loader`` once through each *distinct* model (eval mode, no grad, TF32 off, hooks
    always removed, training flags restored; models are moved to ``device``).

    Inside each forward hook (:class:`tunelens.analysis.measures.layers.ActivationCapture`, so an in-place op after the layer
    cannot change what is seen) the layer's output is flattened to ``(n, d)``, copied to float64 on
    ``device`` and its Gram ``X X^T`` formed; the same copy updates the layer's :class:`ActivationStats`
    and the first batch fills :class:`FeatureMapExamples`. After each batch ``sink`` receives, per entry of
    ``models``, ``{layer: Gram}``. Returns per entry of ``models`` its statistics and example maps.
    ``on_layer(slot, layer, output)`` is called in the same hook and ``on_output(slot, model output, batch)``
    after each forward (``slot``: the index of the distinct model; :func:`tunelens.analysis.engine.passes.record_pass` keeps
    the logits and pooled features that way).
    """
    slot_of: list[int] = []
    slots: list[tuple[nn.Module, list[str]]] = []
    for m, names in zip(models, layer_lists, strict=False):
        ids = [id(s[0]) for s in slots]
        if id(m) in ids:
            s = ids.index(id(m))
            slots[s][1].extend(n for n in names if n not in slots[s][1])
        else:
            s = len(slots)
            slots.append((m, list(names)))
        slot_of.append(s)
    grams: list[dict[str, torch.Tensor]] = [{} for _ in slots]
    stats = [ActivationStats() for _ in slots]
    maps = [FeatureMapExamples(n_examples) for _ in slots]

    buffers: dict[tuple[int, str], torch.Tensor] = {}

    def hook_fn(s: int) -> Callable[[str, torch.Tensor], None]:
        def fn(name: str, out: torch.Tensor) -> None:
            flat = out.reshape(out.shape[0], -1)
            x = buffers.get((s, name))
            if x is None or x.shape != flat.shape:  # reused: no fresh (page-faulting) allocation per batch
                x = buffers[(s, name)] = torch.empty(flat.shape, dtype=torch.float64, device=device)
            x.copy_(flat)
            K = _gram64(x)
            grams[s][name] = K
            stats[s].update(name, out, x, torch.diagonal(K).sum())
            maps[s].update(name, out)
            if on_layer is not None:
                on_layer(s, name, out)

        return fn

    with ExitStack() as stack, torch.no_grad(), no_tf32():
        stack.enter_context(blas_threads(1))  # OpenBLAS threads spin: 7x slower on a busy 2-core machine
        stack.enter_context(eval_mode(*[m for m, _ in slots]))
        for s, (m, names) in enumerate(slots):
            stack.enter_context(ActivationCapture(m.to(device), names, fn=hook_fn(s)))
        for batch in loader:
            x = unpack_batch(batch)[0].to(device, non_blocking=True)
            for s, (m, _) in enumerate(slots):
                grams[s].clear()
                maps[s].add_images(x)
                y = m(x)
                if on_output is not None:
                    on_output(s, y, batch)
            sink([{k: grams[slot_of[i]][k] for k in names} for i, names in enumerate(layer_lists)])
    return [stats[s] for s in slot_of], [maps[s] for s in slot_of]
