"""Comparing attribution maps, and checking them against ground-truth object masks.

Maps are per pixel. A map of shape ``(N, C, H, W)`` is reduced over channels in two
ways, used consistently:

* **signed** map = sum over channels (the attribution of the pixel; its sign says for
  or against the target) -- used by signed Spearman, cosine, and the mask metrics;
* **absolute** map = sum over channels of absolute values (how much the pixel
  matters either way) -- used by absolute Spearman, top-k intersection and SSIM.

Similarities (per sample; 1 = identical):

``spearman``       rank correlation of the signed maps
``spearman_abs``   rank correlation of the absolute maps (Adebayo et al. 2018)
``topk``           |top-k% of a  and  top-k% of b| / |top-k%| on the absolute maps (k = 10%)
``ssim``           structural similarity (Wang et al. 2004) of the absolute maps on a shared
                   scale: both maps of a pair divided by the larger of their maxima, so the
                   data range is [0, 1] for both; 7x7 uniform window, K1 = 0.01, K2 = 0.03,
                   sample covariance (scikit-image's defaults), border of 3 pixels excluded
``cosine``         cosine similarity of the signed maps

Localisation against a boolean mask (per sample and map; higher = more on the object):

``mass``       relevance mass accuracy (Arras et al. 2022, "CLEVR-XAI"): positive
               relevance inside the mask / total positive relevance
``rank_acc``   relevance rank accuracy (Arras et al. 2022): fraction of the K highest-relevance
               pixels inside the mask, K = mask size
``pointing``   pointing game (Zhang et al. 2018): 1 when the maximum-relevance pixel is in the
               mask (optionally dilated by ``tolerance`` pixels)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

__all__ = [
    "LOCALISATION",
    "SIMILARITIES",
    "abs_map",
    "compare_maps",
    "cosine_rows",
    "pointing_game",
    "relevance_mass",
    "relevance_rank_accuracy",
    "shared_scale",
    "signed_map",
    "spearman_rows",
    "ssim",
    "to_maps",
    "topk_intersection",
]

SIMILARITIES = ("spearman", "spearman_abs", "topk", "ssim", "cosine")
LOCALISATION = ("mass", "rank_acc", "pointing")

ArrayLike = np.ndarray | torch.Tensor


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def to_maps(x: ArrayLike, reduce: str = "signed") -> np.ndarray:
    """``(N, H, W)`` float64 maps from ``(N, H, W)`` or ``(N, C, H, W)``: ``signed`` = channel sum,
    ``abs`` = channel sum of absolute values (an ``(N, H, W)`` input is taken as it is, or its absolute value)."""
    a = _np(x)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 4:
        return np.abs(a).sum(1) if reduce == "abs" else a.sum(1)
    if a.ndim == 3:
        return np.abs(a) if reduce == "abs" else a
    raise ValueError(f"maps must be (N, H, W) or (N, C, H, W); got shape {a.shape}")


def signed_map(x: ArrayLike) -> np.ndarray:
    """Channel sum: ``(N, H, W)``."""
    return to_maps(x, "signed")


def abs_map(x: ArrayLike) -> np.ndarray:
    """Channel sum of absolute values: ``(N, H, W)``."""
    return to_maps(x, "abs")


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(1) / den
    r[den <= 1e-300] = np.nan
    return np.clip(r, -1.0, 1.0)


def spearman_rows(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Spearman rank correlation per row of two ``(N, ...)`` arrays (average ranks for ties; NaN for constant rows)."""
    from scipy.stats import rankdata

    a, b = _flat(_np(a)), _flat(_np(b))
    return _pearson_rows(rankdata(a, axis=1), rankdata(b, axis=1))


def cosine_rows(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Cosine similarity per row (NaN when either row is all zeros)."""
    a, b = _flat(_np(a)), _flat(_np(b))
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(1) / den
    r[den <= 1e-300] = np.nan
    return np.clip(r, -1.0, 1.0)


def _top_mask(a: np.ndarray, n_top: np.ndarray | int) -> np.ndarray:
    order = np.argsort(-a, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(a.shape[1])[None].repeat(len(a), 0), axis=1)
    return ranks < np.asarray(n_top).reshape(-1, 1)


def topk_intersection(a: ArrayLike, b: ArrayLike, k: float = 0.1) -> np.ndarray:
    """Fraction of the top ``k`` (a fraction of pixels) of ``a`` that is also in the top ``k`` of ``b``, per row."""
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction of pixels in (0, 1], got {k}")
    a, b = _flat(_np(a)), _flat(_np(b))
    n_top = max(1, int(round(k * a.shape[1])))
    return (_top_mask(a, n_top) & _top_mask(b, n_top)).sum(1) / n_top


def shared_scale(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both maps of each pair divided by the larger of their absolute maxima (pairs of zero maps unchanged)."""
    a, b = _np(a), _np(b)
    axes = tuple(range(1, a.ndim))
    s = np.maximum(np.abs(a).max(axis=axes, keepdims=True), np.abs(b).max(axis=axes, keepdims=True))
    s = np.where(s > 0, s, 1.0)
    return a / s, b / s


def ssim(
    a: ArrayLike, b: ArrayLike, *, win_size: int = 7, data_range: float = 1.0, K1: float = 0.01, K2: float = 0.03
) -> np.ndarray:
    """Mean SSIM per sample of ``(N, H, W)`` maps, as ``skimage.metrics.structural_similarity`` computes it
    with ``win_size``, ``data_range``, a uniform window and ``use_sample_covariance=True``.

    Windows are the fully contained ones (skimage crops ``(win_size - 1) // 2`` pixels at each
    border after filtering, which is the same set). Scale the maps first (:func:`shared_scale`).
    """
    a, b = _np(a), _np(b)
    if a.ndim == 2:
        a, b = a[None], b[None]
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"maps of {a.shape[-2]}x{a.shape[-1]} are smaller than the {win_size}x{win_size} SSIM window")
    x = torch.from_numpy(a)[:, None]
    y = torch.from_numpy(b)[:, None]

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, win_size, stride=1)

    ux, uy = mean(x), mean(y)
    uxx, uyy, uxy = mean(x * x), mean(y * y), mean(x * y)
    npix = win_size**2
    cov_norm = npix / (npix - 1)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


def _masks(masks: ArrayLike, n: int) -> np.ndarray:
    m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    m = m.astype(bool)
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3 or len(m) != n:
        raise ValueError(f"masks must be (N, H, W) booleans for {n} maps; got shape {m.shape}")
    return m


def relevance_mass(maps: ArrayLike, masks: ArrayLike) -> np.ndarray:
    """Positive relevance inside the mask / total positive relevance, per sample (NaN without positive relevance)."""
    r = to_maps(maps, "signed")
    m = _masks(masks, len(r))
    pos = np.clip(r, 0, None)
    tot = pos.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (pos * m).sum(axis=(1, 2)) / tot
    out[tot <= 0] = np.nan
    return out


def relevance_rank_accuracy(maps: ArrayLike, masks: ArrayLike) -> np.ndarray:
    """Fraction of the ``K = |mask|`` highest-relevance pixels that lie in the mask, per sample
    (NaN for empty masks). Ties: the first in row-major order."""
    r = _flat(to_maps(maps, "signed"))
    m = _flat(_masks(masks, len(r)))
    k = m.sum(1)
    top = _top_mask(r, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (top & m).sum(1) / k
    out = out.astype(np.float64)
    out[k == 0] = np.nan
    return out


def pointing_game(maps: ArrayLike, masks: ArrayLike, tolerance: int = 0) -> np.ndarray:
    """1.0 when the pixel of maximum relevance lies in the mask (dilated by ``tolerance`` pixels), else 0.0;
    NaN for empty masks or constant maps. Ties: the first maximum in row-major order."""
    r = to_maps(maps, "signed")
    m = _masks(masks, len(r))
    if tolerance > 0:
        t = torch.from_numpy(m.astype(np.float32))[:, None]
        m = F.max_pool2d(t, 2 * tolerance + 1, stride=1, padding=tolerance)[:, 0].numpy() > 0
    flat = _flat(r)
    idx = flat.argmax(1)
    out = _flat(m)[np.arange(len(r)), idx].astype(np.float64)
    out[(_flat(m).sum(1) == 0) | (flat.max(1) == flat.min(1))] = np.nan
    return out


def compare_maps(
    a: ArrayLike,
    b: ArrayLike,
    masks: ArrayLike | None = None,
    *,
    k: float = 0.1,
    names: Sequence[str] = ("a", "b"),
    win_size: int = 7,
    tolerance: int = 0,
) -> pd.DataFrame:
    """Per-sample comparison of two sets of maps of the same inputs.

    ``a``, ``b``: ``(N, H, W)`` or ``(N, C, H, W)`` tensors or arrays. Returns one row per
    sample with :data:`SIMILARITIES` (see the module docstring for the channel reductions
    and the shared SSIM scale) and, when ``masks`` (``(N, H, W)`` booleans) are given,
    ``mass_<name>``, ``rank_acc_<name>``, ``pointing_<name>`` for each of the two maps.
    """
    sa, sb = to_maps(a, "signed"), to_maps(b, "signed")
    aa, ab = to_maps(a, "abs"), to_maps(b, "abs")
    if sa.shape != sb.shape:
        raise ValueError(f"maps differ in shape: {sa.shape} vs {sb.shape}")
    xa, xb = shared_scale(aa, ab)
    df = pd.DataFrame(
        {
            "sample": np.arange(len(sa)),
            "spearman": spearman_rows(sa, sb),
            "spearman_abs": spearman_rows(aa, ab),
            "topk": topk_intersection(aa, ab, k),
            "ssim": (
                ssim(xa, xb, win_size=win_size, data_range=1.0)
                if min(sa.shape[-2:]) >= win_size
                else np.full(len(sa), np.nan)
            ),
            "cosine": cosine_rows(sa, sb),
        }
    )
    if masks is not None:
        for name, s in zip(names, (sa, sb), strict=False):
            df[f"mass_{name}"] = relevance_mass(s, masks)
            df[f"rank_acc_{name}"] = relevance_rank_accuracy(s, masks)
            df[f"pointing_{name}"] = pointing_game(s, masks, tolerance)
    return df
