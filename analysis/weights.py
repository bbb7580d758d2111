"""Weight deltas between a base and a tuned model: which weights moved, how far, and in what shape.

For each parameter tensor shared by both models, with ``dW = W1 - W0``:

* ``frobenius``   ||dW||_F
* ``relative``    ||dW||_F / ||W0||_F
* ``cosine``      <W0, W1> / (||W0||_F ||W1||_F)
* ``max_abs``     max |dW|
* ``spectral``    ||dW||_2, the largest singular value
* ``stable_rank`` ||dW||_F^2 / ||dW||_2^2 (Rudelson and Vershynin 2007)
* ``effective_rank`` exp(H(p)), p_i = s_i / sum_j s_j (Roy and Vetterli 2007)
* ``top1_energy`` s_1^2 / sum_i s_i^2, the share of ||dW||_F^2 in the top singular direction

Matrix quantities use conv kernels reshaped to ``out x (in*k*k)``; for vectors
(biases, norm scales) they are NaN. A zero delta has NaN ranks (0/0). Parameters
whose shape differs (a replaced head) are rows with ``status == "replaced"`` and no
numbers. BatchNorm running statistics get rows of ``kind == "bn_stat"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from .layers import stage_of

__all__ = ["ArchitectureMismatch", "aggregate_deltas", "as_state_dict", "first_conv_filters", "weight_deltas"]

_BN_STATS = ("running_mean", "running_var")


class ArchitectureMismatch(ValueError):
    """Two models (or state dicts) that do not have the same parameter names."""


def as_state_dict(m: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(m, nn.Module):
        return {k: v.detach() for k, v in m.state_dict().items()}
    if isinstance(m, Mapping):
        bad = [k for k, v in m.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"state dict entry {bad[0]!r} is {type(m[bad[0]]).__name__}, expected a tensor")
        return dict(m)
    raise TypeError(f"expected an nn.Module or a state dict, got {type(m).__name__}")


def _check_keys(a: dict, b: dict) -> None:
    ka = [k for k in a if not k.endswith("num_batches_tracked")]
    kb = [k for k in b if not k.endswith("num_batches_tracked")]
    missing = [k for k in ka if k not in b]
    extra = [k for k in kb if k not in a]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"in base but not in tuned: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if extra:
            parts.append(f"in tuned but not in base: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
        raise ArchitectureMismatch(
            "the two models do not have the same architecture ("
            + "; ".join(parts)
            + "). Compare checkpoints of one architecture."
        )


def _matrix_stats(d: torch.Tensor) -> dict[str, float]:
    m = d.reshape(d.shape[0], -1).double()
    if not bool(torch.isfinite(m).all()):
        nan = float("nan")
        return {"spectral": nan, "stable_rank": nan, "effective_rank": nan, "top1_energy": nan}
    if m.shape[1] > m.shape[0]:
        m = m.T  # same singular values; LAPACK is far faster on tall matrices than on wide ones
    if m.shape[0] > 8 * m.shape[1]:  # very tall (a word-embedding table): s_i = sqrt(eig_i(m^T m)), n x n only
        s = torch.linalg.eigvalsh(m.T @ m).clamp_min(0).sqrt().flip(0)
    else:
        s = torch.linalg.svdvals(m)
    tot2 = float((s**2).sum())
    if tot2 == 0.0:
        return {
            "spectral": 0.0,
            "stable_rank": float("nan"),
            "effective_rank": float("nan"),
            "top1_energy": float("nan"),
        }
    p = s / s.sum()
    p = p[p > 0]
    return {
        "spectral": float(s[0]),
        "stable_rank": tot2 / float(s[0]) ** 2,
        "effective_rank": float(torch.exp(-(p * p.log()).sum())),
        "top1_energy": float(s[0]) ** 2 / tot2,
    }


def weight_deltas(
    base: nn.Module | Mapping[str, torch.Tensor],
    tuned: nn.Module | Mapping[str, torch.Tensor],
    include_buffers: bool = True,
) -> pd.DataFrame:
    """One row per parameter tensor (and BatchNorm running statistic) shared by ``base`` and ``tuned``.

    Columns: ``name``, ``module``, ``stage``, ``depth`` (index of the stage in forward order), ``kind``
    (``weight``, ``bias``, ``vector``, ``bn_stat``), ``shape``, ``numel``, ``status`` (``compared`` or
    ``replaced``), ``norm_base``, ``frobenius``, ``relative``, ``cosine``, ``max_abs``, ``spectral``,
    ``stable_rank``, ``effective_rank``, ``top1_energy``. See the module docstring for the formulas.
    """
    a, b = as_state_dict(base), as_state_dict(tuned)
    _check_keys(a, b)
    param_names = {n for n, _ in base.named_parameters()} if isinstance(base, nn.Module) else None
    rows = []
    stages: list[str] = []
    for name, w0 in a.items():
        if name.endswith("num_batches_tracked"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_stat = leaf in _BN_STATS
        if is_stat and not include_buffers:
            continue
        if param_names is not None and name not in param_names and not is_stat:
            continue  # other buffers
        w1 = b[name]
        module = name.rsplit(".", 1)[0] if "." in name else ""
        stage = stage_of(name)
        if stage not in stages:
            stages.append(stage)
        kind = "bn_stat" if is_stat else ("weight" if w0.ndim >= 2 else ("bias" if leaf == "bias" else "vector"))
        row = {
            "name": name,
            "module": module,
            "stage": stage,
            "depth": stages.index(stage),
            "kind": kind,
            "shape": "x".join(map(str, w0.shape))
            + (" -> " + "x".join(map(str, w1.shape)) if w0.shape != w1.shape else ""),
            "numel": int(w0.numel()),
        }
        if w0.shape != w1.shape:
            row["status"] = "replaced"
            rows.append(row)
            continue
        w0d, w1d = w0.detach().double().cpu(), w1.detach().double().cpu()
        d = w1d - w0d
        n0, n1, nd = float(w0d.norm()), float(w1d.norm()), float(d.norm())
        row.update(
            status="compared",
            norm_base=n0,
            frobenius=nd,
            relative=nd / n0 if n0 > 0 else (0.0 if nd == 0 else float("inf")),
            cosine=float((w0d * w1d).sum()) / (n0 * n1) if n0 > 0 and n1 > 0 else float("nan"),
            max_abs=float(d.abs().max()) if d.numel() else 0.0,
        )
        if kind == "weight":
            row.update(_matrix_stats(d))
        rows.append(row)
    cols = [
        "name",
        "module",
        "stage",
        "depth",
        "kind",
        "shape",
        "numel",
        "status",
        "norm_base",
        "frobenius",
        "relative",
        "cosine",
        "max_abs",
        "spectral",
        "stable_rank",
        "effective_rank",
        "top1_energy",
    ]
    return pd.DataFrame(rows).reindex(columns=cols)


def aggregate_deltas(df: pd.DataFrame, by: str = "stage", include_stats: bool = False) -> pd.DataFrame:
    """Aggregate :func:`weight_deltas` rows per ``stage`` or ``module``.

    ``relative`` of a group is sqrt(sum ||dW||_F^2) / sqrt(sum ||W0||_F^2) over its compared tensors
    (BatchNorm statistics excluded unless ``include_stats``); ``mean_relative`` is the unweighted mean of
    the tensors' relative changes; ``replaced`` counts replaced tensors.
    """
    if by not in ("stage", "module"):
        raise ValueError(f"by must be 'stage' or 'module', got {by!r}")
    d = df if include_stats else df[df["kind"] != "bn_stat"]
    out = []
    for key, g in d.groupby(by, sort=False):
        c = g[g["status"] == "compared"]
        num = float(np.sqrt((c["frobenius"] ** 2).sum()))
        den = float(np.sqrt((c["norm_base"] ** 2).sum()))
        out.append(
            {
                by: key,
                "depth": int(g["depth"].min()),
                "tensors": len(g),
                "numel": int(g["numel"].sum()),
                "replaced": int((g["status"] == "replaced").sum()),
                "frobenius": num,
                "relative": num / den if den > 0 else float("nan"),
                "mean_relative": float(c["relative"].mean()) if len(c) else float("nan"),
                "min_cosine": float(c["cosine"].min()) if len(c) else float("nan"),
            }
        )
    return pd.DataFrame(out).sort_values("depth", kind="stable").reset_index(drop=True)


def first_conv_filters(
    base: nn.Module | Mapping[str, torch.Tensor], tuned: nn.Module | Mapping[str, torch.Tensor]
) -> dict[str, np.ndarray] | None:
    """The first convolution's kernels of both models and their difference (``out x in x k x k`` arrays),
    or None when there is no 4-d weight with matching shapes."""
    a, b = as_state_dict(base), as_state_dict(tuned)
    for name, w in a.items():
        if w.ndim == 4 and name in b and b[name].shape == w.shape:
            w0, w1 = w.detach().float().cpu().numpy(), b[name].detach().float().cpu().numpy()
            return {"name": name, "base": w0, "tuned": w1, "delta": w1 - w0}
    return None
