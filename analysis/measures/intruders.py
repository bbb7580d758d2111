"""Intruder dimensions: new, high-ranking singular directions that fine-tuning put into a weight matrix.

Shuttleworth, Andreas, Torralba and Sharma (2024), "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
(arXiv:2410.21228). For a weight matrix with base ``W0`` and tuned ``W1`` (conv kernels reshaped to
``out x (in*k*k)``), with thin SVDs ``W0 = U0 S0 V0^T`` and ``W1 = U1 S1 V1^T``:

* for each of the top-``k`` left singular vectors ``u1_j`` of ``W1`` (by singular value),
  ``c_j = max_i |<u1_j, u0_i>|`` over *all* left singular vectors ``u0_i`` of ``W0`` (not only its top k;
  the vectors are unit norm, so this is the largest absolute cosine);
* ``u1_j`` is an *intruder dimension* when ``c_j < threshold`` (the paper uses thresholds around 0.5):
  a top direction of the tuned matrix that is close to no direction of the base matrix.

Singular vectors are only defined for nonzero singular values: the base's vectors are those with
``s_i > max(out, in) * eps * s_1`` (``eps`` of the weights' dtype, the usual numerical-rank tolerance; at
least ``sqrt(max(out, in) * 1e-16) * s_1``, the precision of the Gram eigendecomposition used), and
the effective ``k`` is ``min(k, rank(W1))`` with the same tolerance. The paper reads counts against a
control (:func:`intruder_control`): the base against itself plus a random perturbation of the same
Frobenius norm per layer as the fine-tuning update, which shows how many intruders a change of that size
makes without any structure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from tunelens.core.naming import stage_of
from tunelens.core.runtime import torch_threads

from .tensor_measures import EXACT_MAX_NUMEL, name_seed, top_left_vectors

__all__ = [
    "BASE_K",
    "EXACT_MAX_NUMEL",
    "aggregate_intruders",
    "intruder_control",
    "intruder_dimensions",
    "intruder_row",
    "topk_intruders",
]

_COLUMNS = ["layer", "stage", "shape", "k", "threshold", "intruders", "min_max_cos", "mean_max_cos", "method"]

#: Base directions compared above :data:`EXACT_MAX_NUMEL` (the streaming audit's ``intruder_base_k``).
BASE_K = 32


def topk_intruders(
    m0: torch.Tensor, m1: torch.Tensor, k: int, threshold: float, *, base_k: int = BASE_K, seed: int = 0, niter: int = 2
) -> dict:
    """Intruders of a matrix too large for every singular vector: the top ``k`` left singular vectors of ``m1``
    against the top ``base_k`` of ``m0``, both from :func:`.tensor_measures.randomized_svd` (seeds ``seed + 1``
    and ``seed + 2``). Fewer base directions can only lower a max-cosine: the counts are upper bounds of the
    exact ones. Keys ``k``, ``intruders``, ``min_max_cos``, ``mean_max_cos``, ``method`` (``top-K``)."""
    u1 = top_left_vectors(m1, k, seed=seed + 1, niter=niter)
    u0 = top_left_vectors(m0, base_k, seed=seed + 2, niter=niter)
    return _topk_row(u0, u1, threshold)


def _topk_row(u0: torch.Tensor, u1: torch.Tensor, threshold: float) -> dict:
    cos = (u1.T @ u0).abs().amax(dim=1).double().cpu()
    return {
        "k": int(cos.numel()),
        "intruders": int((cos < threshold).sum()),
        "min_max_cos": float(cos.min()) if cos.numel() else float("nan"),
        "mean_max_cos": float(cos.mean()) if cos.numel() else float("nan"),
        "method": f"top-{u0.shape[1]}",
    }


def _matrices(m: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the parameters with at least 2 dims (of every >=2-d tensor of a state dict)."""
    if isinstance(m, nn.Module):
        items: Iterable[tuple[str, torch.Tensor]] = m.named_parameters()
    elif isinstance(m, Mapping):
        items = m.items()
    else:
        raise TypeError(f"expected an nn.Module or a state dict, got {type(m).__name__}")
    out = {}
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is {type(t).__name__}, expected a tensor")
        if t.ndim >= 2:
            out[name] = t.detach().to("cpu", copy=True)
    return out


def _select(names: list[str], layers: Iterable[str] | None) -> list[str]:
    if layers is None:
        return names
    if isinstance(layers, str):
        layers = [layers]
    chosen: list[str] = []
    for spec in layers:
        hit = [n for n in names if n in (spec, f"{spec}.weight")]
        if not hit:
            raise ValueError(f"no 2-d weight named {spec!r} (or {spec + '.weight'!r}) in both models")
        chosen.extend(h for h in hit if h not in chosen)
    return [n for n in names if n in chosen]


def _pairs(
    base: nn.Module | Mapping[str, torch.Tensor],
    tuned: nn.Module | Mapping[str, torch.Tensor],
    layers: Iterable[str] | None,
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    a, b = _matrices(base), _matrices(tuned)
    names = [n for n, t in a.items() if n in b and b[n].shape == t.shape]
    names = [n for n in names if a[n].shape[0] > 1 and a[n][0].numel() > 1]  # a single row or column: one direction
    return [(n, a[n], b[n]) for n in _select(names, layers)]


def _left_vectors(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Left singular vectors of ``w`` (columns, by decreasing singular value) for the nonzero singular values.

    From the eigendecomposition of the smaller Gram matrix instead of an SVD (about 10x faster on ResNet
    kernels, the same max-cosines to 1e-12 in float64): ``W W^T = U S^2 U^T`` when ``W`` has no more rows
    than columns; otherwise ``W^T W = V S^2 V^T`` and ``U = W V / S`` for the nonzero ``S``. In float64 the
    Gram's rounding (about ``n * 1e-16 * s_1^2``) leaves ``S`` accurate to ``s_1 * sqrt(n * 1e-16)``, so
    the rank tolerance is at least that much (``1e-7 s_1`` for a 100-wide matrix): far below float32's
    ``max(out, in) * eps * s_1`` for the float32 weights of real models; float64 weights lose directions
    under ``1e-7 s_1``, which the max-cosines of the top-k tuned directions never depend on in practice."""
    rows, cols = w.shape
    lam, vec = torch.linalg.eigh(w @ w.T if rows <= cols else w.T @ w)
    lam, vec = lam.flip(0), vec.flip(1)  # eigh sorts ascending
    s = lam.clamp_min(0).sqrt()
    if s.numel() == 0 or float(s[0]) == 0.0:
        return w.new_zeros(rows, 0)
    gram_floor = (max(w.shape) * float(torch.finfo(torch.float64).eps)) ** 0.5
    rank = int((s > max(max(w.shape) * eps, gram_floor) * s[0]).sum())
    if rows <= cols:
        return vec[:, :rank]
    return (w @ vec[:, :rank]) / s[:rank]


def _base_vectors(name: str, w0: torch.Tensor, eps: float, device: torch.device, cache: dict | None) -> torch.Tensor:
    """The base's left singular vectors, from ``cache`` when the same tensor was decomposed before (same name,
    shape, dtype, sum and norm): every tuned model and control is read against the same base."""
    m0 = w0.reshape(w0.shape[0], -1).to(device, torch.float64)
    if cache is None:
        return _left_vectors(m0, eps)
    key = (name, tuple(w0.shape), str(w0.dtype), float(m0.sum()), float(m0.norm()), str(device))
    if key not in cache:
        cache[key] = _left_vectors(m0, eps)
    return cache[key]


def intruder_row(
    name: str,
    w0: torch.Tensor,
    w1: torch.Tensor,
    k: int,
    threshold: float,
    device: torch.device,
    cache: dict | None = None,
    *,
    exact_max_numel: int | None = None,
    base_k: int = BASE_K,
    niter: int = 2,
) -> dict:
    """One matrix's intruder dimensions: how many of the top ``k`` left singular vectors of ``w1`` (the tuned
    matrix, W0 + dW) have a largest |cosine| below ``threshold`` with every left singular vector of ``w0``
    (Shuttleworth et al. 2024), with the least and mean of those largest cosines; ``cache`` keeps the base's
    vectors by ``name``. ``method`` says how: ``exact`` (every singular vector, float64), or above
    ``exact_max_numel`` entries (None: never) ``top-K`` (:func:`topk_intruders`, seeded by the name)."""
    if exact_max_numel is not None and w0.numel() > exact_max_numel:
        return _topk_intruder_row(name, w0, w1, k, threshold, device, cache, base_k, niter)
    eps = float(torch.finfo(w0.dtype if w0.dtype.is_floating_point else torch.float32).eps)
    m1 = w1.reshape(w1.shape[0], -1).to(device, torch.float64)
    u0 = _base_vectors(name, w0, eps, device, cache)
    u1 = _left_vectors(m1, eps)[:, :k]
    if u1.shape[1] == 0:
        max_cos = np.zeros(0)
    elif u0.shape[1] == 0:
        max_cos = np.zeros(u1.shape[1])  # a zero base matrix: every tuned direction is new
    else:
        max_cos = (u1.T @ u0).abs().amax(dim=1).cpu().numpy()
    return {
        "layer": name,
        "stage": stage_of(name),
        "shape": "x".join(map(str, w0.shape)),
        "k": int(max_cos.size),
        "threshold": threshold,
        "intruders": int((max_cos < threshold).sum()),
        "min_max_cos": float(max_cos.min()) if max_cos.size else float("nan"),
        "mean_max_cos": float(max_cos.mean()) if max_cos.size else float("nan"),
        "method": "exact",
    }


def _topk_intruder_row(
    name: str,
    w0: torch.Tensor,
    w1: torch.Tensor,
    k: int,
    threshold: float,
    device: torch.device,
    cache: dict | None,
    base_k: int,
    niter: int,
) -> dict:
    seed = name_seed(name)
    m0 = w0.reshape(w0.shape[0], -1)
    m1 = w1.reshape(w1.shape[0], -1).to(device)  # float32 products; another dtype is converted block by block
    key = ("top", name, tuple(w0.shape), str(w0.dtype), float(m0.sum()), float(m0.norm()), str(device), base_k, niter)
    if cache is None or key not in cache:
        u0 = top_left_vectors(m0.to(device), base_k, seed=seed + 2, niter=niter)
        if cache is not None:
            cache[key] = u0
    else:
        u0 = cache[key]
    u1 = top_left_vectors(m1, k, seed=seed + 1, niter=niter)
    row = _topk_row(u0, u1, threshold)
    return {
        "layer": name,
        "stage": stage_of(name),
        "shape": "x".join(map(str, w0.shape)),
        "threshold": threshold,
        **row,
    }


def _check(k: int, threshold: float) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def intruder_dimensions(
    base: nn.Module | Mapping[str, torch.Tensor],
    tuned: nn.Module | Mapping[str, torch.Tensor],
    *,
    k: int = 10,
    threshold: float = 0.5,
    layers: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    cache: dict | None = None,
    exact_max_numel: int | None = EXACT_MAX_NUMEL,
) -> pd.DataFrame:
    """Intruder dimensions of each 2-d weight matrix (Linear; conv kernels as ``out x in*k*k``) that ``base``
    and ``tuned`` share with the same shape (Shuttleworth et al. 2024; definition in the module docstring).

    ``layers``: parameter names (``"fc.weight"``) or module names (``"fc"``); None: all. ``device``: where the
    SVDs run (float64; default CPU). The models are not touched: the weights are copied (detached, CPU) first.
    ``cache``: a dict shared between calls on the same base (several tuned models, the controls) so that the
    base's singular vectors are computed once; None: no reuse. ``exact_max_numel``: matrices of more entries
    get randomized top-k vectors (:func:`topk_intruders`; None: every matrix exactly).

    One row per matrix: ``layer``, ``stage``, ``shape``, ``k`` (effective: ``min(k, rank(W1))``),
    ``threshold``, ``intruders`` (how many of the top-k tuned directions have max |cos| < threshold),
    ``min_max_cos`` and ``mean_max_cos`` (smallest and mean of the k max-cosines), ``method`` (``exact``, or
    ``top-K``: against the base's top ``K`` directions).
    """
    _check(k, threshold)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    with torch_threads(1 if dev.type == "cpu" else None):
        rows = [
            intruder_row(n, w0, w1, k, threshold, dev, cache, exact_max_numel=exact_max_numel)
            for n, w0, w1 in _pairs(base, tuned, layers)
        ]
    return pd.DataFrame(rows, columns=_COLUMNS)


def intruder_control(
    base: nn.Module | Mapping[str, torch.Tensor],
    *,
    like: nn.Module | Mapping[str, torch.Tensor],
    k: int = 10,
    threshold: float = 0.5,
    seed: int = 0,
    layers: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    cache: dict | None = None,
    exact_max_numel: int | None = EXACT_MAX_NUMEL,
) -> pd.DataFrame:
    """The control for :func:`intruder_dimensions`: ``base`` against ``base + E`` where, per matrix, ``E`` is
    Gaussian noise scaled to ``||E||_F = ||W_like - W_base||_F`` (``like`` is the tuned model), drawn from
    ``torch.Generator().manual_seed(seed)`` in layer order. An unstructured change of the fine-tuning's size:
    intruder counts well above these are what the paper attributes to the fine-tuning method.

    Same columns as :func:`intruder_dimensions`, plus ``perturbation`` (``||E||_F``); ``cache`` as there.
    """
    _check(k, threshold)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    rows = []
    with torch_threads(1 if dev.type == "cpu" else None):
        for name, w0, w1 in _pairs(base, like, layers):
            big = exact_max_numel is not None and w0.numel() > exact_max_numel
            dt = torch.float32 if big else torch.float64  # the randomized path computes in float32
            w0d = w0.to(dt)
            norm = float(torch.linalg.vector_norm(w1.to(dt) - w0d, dtype=torch.float64))
            e = torch.randn(w0.shape, generator=g, dtype=dt)
            noisy = w0d + e * (norm / float(torch.linalg.vector_norm(e, dtype=torch.float64))) if norm > 0 else w0d
            row = intruder_row(name, w0, noisy, k, threshold, dev, cache, exact_max_numel=exact_max_numel)
            row["perturbation"] = norm
            rows.append(row)
    return pd.DataFrame(rows, columns=[*_COLUMNS, "perturbation"])


def aggregate_intruders(df: pd.DataFrame, by: str = "stage") -> pd.DataFrame:
    """Sum :func:`intruder_dimensions` (or :func:`intruder_control`) rows per ``by`` (a column, ``stage`` by
    default), in order of first appearance: ``layers``, ``layers_with_intruders``, ``intruders``, ``k``
    (directions examined), ``intruder_share`` (intruders / k), ``min_max_cos``, ``mean_max_cos`` (mean over
    all examined directions)."""
    if by not in df.columns:
        raise ValueError(f"by must be a column of the table ({', '.join(df.columns)}), got {by!r}")
    out = []
    for key, g in df.groupby(by, sort=False):
        kk = int(g["k"].sum())
        out.append(
            {
                by: key,
                "layers": len(g),
                "layers_with_intruders": int((g["intruders"] > 0).sum()),
                "intruders": int(g["intruders"].sum()),
                "k": kk,
                "intruder_share": float(g["intruders"].sum()) / kk if kk else float("nan"),
                "min_max_cos": float(g["min_max_cos"].min()),
                "mean_max_cos": float((g["mean_max_cos"] * g["k"]).sum()) / kk if kk else float("nan"),
            }
        )
    return pd.DataFrame(out)
