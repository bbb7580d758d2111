"""Faithfulness of a map to its model: the deletion and insertion games (Petsiuk et al. 2018, "RISE").

Pixels are taken in order of decreasing attribution (the signed map: channel sum)
in ``steps`` equal steps. **Deletion** replaces them by a baseline (zeros, i.e. the
dataset's mean colour in normalised inputs, by default) starting from the image; a
faithful map makes the target's probability fall fast (low AUC is good).
**Insertion** puts them back into a blurred copy of the image; a faithful map makes the
probability rise fast (high AUC is good). Probabilities are the softmax of the logits
at the target class; the AUC is the trapezoid area under the curve over the fraction
of pixels moved, in [0, 1]. All ``steps + 1`` variants of a chunk of images go
through the model in one batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tunelens.analysis.measures.attribution.map_metrics import to_maps
from tunelens.core.models import model_device

__all__ = ["deletion_insertion", "gaussian_blur"]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` images with replicate padding."""
    if sigma <= 0:
        return x.clone()
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (r, r, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode="replicate")
    return F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _trapz(y: np.ndarray, dx: float) -> np.ndarray:
    return (y[:, 1:] + y[:, :-1]).sum(1) * dx / 2


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor | np.ndarray,
    target: torch.Tensor,
    *,
    steps: int = 16,
    deletion_baseline: str | float = 0.0,
    blur_sigma: float | None = None,
    eval_batch: int = 512,
) -> dict[str, np.ndarray]:
    """Deletion and insertion AUCs (and curves) per image for ``model`` in eval mode.

    ``maps``: ``(N, H, W)`` or ``(N, C, H, W)``; ``target``: class per image;
    ``deletion_baseline``: a value, or ``"blur"`` for the blurred image;
    ``blur_sigma``: of the insertion start (and a blurred deletion baseline), default ``H / 8``.
    Returns ``deletion_auc``, ``insertion_auc`` (``(N,)``) and ``deletion_curve``,
    ``insertion_curve`` (``(N, steps + 1)``).
    """
    if model.training:
        raise RuntimeError("deletion/insertion needs the model in eval mode")
    dev = model_device(model)
    n, c, h, w = inputs.shape
    r = torch.from_numpy(to_maps(maps, "signed")).reshape(n, -1)
    order = torch.argsort(-r, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w).expand(n, -1).contiguous())
    counts = torch.tensor([round(t * h * w / steps) for t in range(steps + 1)])
    sigma = h / 8 if blur_sigma is None else blur_sigma
    target = torch.as_tensor(target).long().cpu()
    curves = {"deletion": np.zeros((n, steps + 1)), "insertion": np.zeros((n, steps + 1))}
    chunk = max(1, eval_batch // (steps + 1))
    for s in range(0, n, chunk):
        x = inputs[s : s + chunk].to(dev).float()
        k = len(x)
        blurred = gaussian_blur(x, sigma)
        if deletion_baseline == "blur":
            base = blurred
        else:
            base = torch.full_like(x, float(deletion_baseline))
        moved = (ranks[s : s + k, None, :] < counts[None, :, None]).to(dev)  # (k, steps+1, HW)
        moved = moved.view(k, steps + 1, 1, h, w)
        dele = torch.where(moved, base[:, None], x[:, None]).view(-1, c, h, w)
        ins = torch.where(moved, x[:, None], blurred[:, None]).view(-1, c, h, w)
        t = target[s : s + k].to(dev).repeat_interleave(steps + 1)
        for name, batch in (("deletion", dele), ("insertion", ins)):
            p = torch.cat(
                [F.softmax(model(batch[i : i + eval_batch]).float(), 1) for i in range(0, len(batch), eval_batch)]
            )
            curves[name][s : s + k] = p[torch.arange(len(t), device=dev), t].view(k, steps + 1).cpu().numpy()
    return {
        "deletion_auc": _trapz(curves["deletion"], 1 / steps),
        "insertion_auc": _trapz(curves["insertion"], 1 / steps),
        "deletion_curve": curves["deletion"],
        "insertion_curve": curves["insertion"],
    }
