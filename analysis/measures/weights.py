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

Computation: norms in float64 (``<W0, W1> = (||W0||^2 + ||W1||^2 - ||dW||^2) / 2``). Singular values of
``dW`` (tall side first, ``m >= n``) are the square roots of the eigenvalues of the ``n x n`` Gram matrix
``dW^T dW``, all deltas of one shape in one batch: float32 where the spectrum is shallow enough for it,
float64 otherwise, and a float64 SVD for deltas with a deep tail (low rank), where squaring would lose the
small singular values. ``bench/weights.py`` checks the result against one float64 SVD per matrix (the
previous implementation): differences below 1e-5 relative (6e-6 at most on convnext_tiny and resnet50).
Measured on a shared two-core machine: 27-30x less wall time than the previous implementation on
convnext_tiny; most of that is the single thread (see ``num_threads``), 2x at equal threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from tunelens.analysis.measures.layers import stage_of
from tunelens.core.naming import ArchitectureMismatch
from tunelens.core.runtime import torch_threads
from tunelens.core.stages import StageMap, stages

from .tensor_measures import EXACT_MAX_NUMEL, name_seed, update_spectrum

__all__ = ["ArchitectureMismatch", "aggregate_deltas", "as_state_dict", "first_conv_filters", "weight_deltas"]

_BN_STATS = ("running_mean", "running_var")


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


_SPECTRAL = ("spectral", "stable_rank", "effective_rank", "top1_energy")
#: Deltas of more than :data:`EXACT_MAX_NUMEL` entries get the top ``RANK_K`` singular values by a randomized
#: SVD (:func:`.tensor_measures.update_spectrum`, ``rank_method`` ``top-K``), the others all of them (``exact``).
RANK_K = 32
# The squared singular values come from the Gram matrix M^T M of the short side (M tall, m >= n),
# computed first in float32. A symmetric eigensolver is backward stable: each eigenvalue has an absolute
# error of about n * eps * lambda_1, so a relative one of n * eps * lambda_1 / lambda_i. float32 is kept
# only where lambda_min >= _F32_MIN * lambda_1 (the tail is shallow, as for the dense updates of full
# fine-tuning) and n >= _F32_MIN_N (below that float64 costs nothing); float64 Gram where
# lambda_min >= _F64_MIN * lambda_1; otherwise (low-rank or rank-deficient deltas, whose tiny singular values
# squaring would lose) a float64 SVD, the reference computation.
_F32_MIN = 1e-2
_F32_MIN_N = 64
_F64_MIN = 1e-5
_PENDING_BYTES = 512 * 2**20  # deltas held for batching at most; a group is decomposed when it reaches this


def _gram_eigvals(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Eigenvalues (descending, clamped at 0) of ``m^T m`` for a batch ``B x rows x cols`` of tall matrices."""
    x = m.to(dtype)
    lam = torch.linalg.eigvalsh(x.mT @ x).flip(-1).double()
    return lam.clamp_min(0.0)


def _shallow(lam: torch.Tensor, floor: float) -> torch.Tensor:
    """Which rows of a batch of descending eigenvalues have lambda_min >= floor * lambda_1 > 0."""
    return (lam[:, -1] >= floor * lam[:, 0]) & (lam[:, 0] > 0)


def _singular_values(mats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Singular values (float64, descending) of same-shape tall float64 matrices, batched.

    Equal to ``torch.linalg.svdvals`` in float64 to about 1e-5 relative (see the tolerances above)."""
    n = mats[0].shape[1]
    batch = torch.stack(mats)
    out = torch.empty(batch.shape[0], n, dtype=torch.float64)
    todo = torch.arange(batch.shape[0])
    if n >= _F32_MIN_N:
        lam = _gram_eigvals(batch, torch.float32)
        ok = _shallow(lam, _F32_MIN)
        out[ok] = lam[ok].sqrt()
        todo = todo[~ok]
    if len(todo):
        lam = _gram_eigvals(batch[todo], torch.float64)
        ok = _shallow(lam, _F64_MIN)
        out[todo[ok]] = lam[ok].sqrt()
        for i in todo[~ok].tolist():
            out[i] = torch.linalg.svdvals(batch[i])
    return list(out)


def _spectral_stats(s: torch.Tensor, fro2: float | None = None) -> dict[str, float]:
    """The matrix quantities of the module docstring from singular values ``s`` (descending) and
    ``fro2 = ||dW||_F^2 = sum_i s_i^2`` when known exactly (the sum of computed ``s_i^2`` otherwise)."""
    tot2 = float((s**2).sum()) if fro2 is None else fro2
    if tot2 == 0.0:
        return {
            "spectral": 0.0,
            "stable_rank": float("nan"),
            "effective_rank": float("nan"),
            "top1_energy": float("nan"),
        }
    s1 = float(s[0])
    p = s / s.sum()
    p = p[p > 0]
    return {
        "spectral": s1,
        "stable_rank": tot2 / s1**2,
        "effective_rank": float(torch.exp(-(p * p.log()).sum())),
        "top1_energy": s1**2 / tot2,
    }


def _tall(d: torch.Tensor) -> torch.Tensor:
    """``d`` as a matrix (conv kernels ``out x in*k*k``), transposed to have at least as many rows as columns."""
    m = d.reshape(d.shape[0], -1)
    return m.T if m.shape[1] > m.shape[0] else m


def _flush(group: list[tuple[dict, torch.Tensor]]) -> None:
    spectra = _singular_values([m for _, m in group])
    for (row, _), s in zip(group, spectra, strict=True):
        row.update(_spectral_stats(s, row["frobenius"] ** 2))


def _delta_rows(
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    param_names: set[str] | None,
    include_buffers: bool,
    stage_of: Callable[[str], str] = stage_of,
    exact_max_numel: int | None = EXACT_MAX_NUMEL,
) -> list[dict]:
    rows = []
    stages: dict[str, int] = {}
    pending: dict[tuple[int, ...], list[tuple[dict, torch.Tensor]]] = {}
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
        stage = stages.setdefault(stage_of(name), len(stages))
        kind = "bn_stat" if is_stat else ("weight" if w0.ndim >= 2 else ("bias" if leaf == "bias" else "vector"))
        row = {
            "name": name,
            "module": name.rsplit(".", 1)[0] if "." in name else "",
            "stage": stage_of(name),
            "depth": stage,
            "kind": kind,
            "shape": "x".join(map(str, w0.shape))
            + (" -> " + "x".join(map(str, w1.shape)) if w0.shape != w1.shape else ""),
            "numel": int(w0.numel()),
        }
        rows.append(row)
        if w0.shape != w1.shape:
            row["status"] = "replaced"
            continue
        w0, w1 = w0.detach().cpu(), w1.detach().cpu()
        d = w1.to(torch.float64, copy=True).sub_(w0)  # a copy: never the caller's tensor
        n0, n1 = (float(torch.linalg.vector_norm(w, dtype=torch.float64)) for w in (w0, w1))
        nd = float(torch.linalg.vector_norm(d))
        # <W0, W1> = (||W0||^2 + ||W1||^2 - ||dW||^2) / 2: no float64 copies of W0 and W1 needed
        cos = min(1.0, max(-1.0, (n0 * n0 + n1 * n1 - nd * nd) / (2 * n0 * n1))) if n0 > 0 and n1 > 0 else float("nan")
        row.update(
            status="compared",
            norm_base=n0,
            frobenius=nd,
            relative=nd / n0 if n0 > 0 else (0.0 if nd == 0 else float("inf")),
            cosine=cos if math.isfinite(nd) else float("nan"),
            max_abs=float(torch.linalg.vector_norm(d, ord=math.inf)) if d.numel() else 0.0,
        )
        if kind != "weight":
            continue
        if not math.isfinite(nd):  # a NaN or inf anywhere in the delta
            row.update(dict.fromkeys(_SPECTRAL, float("nan")), rank_method="not finite")
        elif nd == 0.0:
            row.update(_spectral_stats(torch.zeros(1, dtype=torch.float64)), rank_method="zero update")
        elif exact_max_numel is not None and d.numel() > exact_max_numel:
            m32 = d.reshape(d.shape[0], -1).float()
            s, method = update_spectrum(m32, exact_max_numel=exact_max_numel, k=RANK_K, seed=name_seed(name))
            row.update(_spectral_stats(s, nd**2), rank_method=method)
        else:
            row["rank_method"] = "exact"
            m = _tall(d)
            group = pending.setdefault(tuple(m.shape), [])
            group.append((row, m))
            if len(group) * m.numel() * m.element_size() >= _PENDING_BYTES:
                _flush(pending.pop(tuple(m.shape)))
    for group in pending.values():
        _flush(group)
    return rows


def weight_deltas(
    base: nn.Module | Mapping[str, torch.Tensor],
    tuned: nn.Module | Mapping[str, torch.Tensor],
    include_buffers: bool = True,
    *,
    num_threads: int | None = 1,
    stage_map: StageMap | None = None,
    exact_max_numel: int | None = EXACT_MAX_NUMEL,
) -> pd.DataFrame:
    """One row per parameter tensor (and BatchNorm running statistic) shared by ``base`` and ``tuned``.

    Columns: ``name``, ``module``, ``stage``, ``depth`` (index of the stage in forward order), ``kind``
    (``weight``, ``bias``, ``vector``, ``bn_stat``), ``shape``, ``numel``, ``status`` (``compared`` or
    ``replaced``), ``norm_base``, ``frobenius``, ``relative``, ``cosine``, ``max_abs``, ``spectral``,
    ``stable_rank``, ``effective_rank``, ``top1_energy``, ``rank_method`` (how the singular values were found:
    ``exact``; ``top-K`` for deltas of more than ``exact_max_numel`` entries, whose top ``K`` singular values
    come from a randomized SVD, :func:`.tensor_measures.update_spectrum`: ``spectral`` and ``stable_rank`` as
    exact, ``effective_rank`` that of the best rank-K approximation; ``zero update``; ``not finite``). See the
    module docstring for the formulas.

    Norms and cosines are computed in float64. The singular values of all deltas of one shape are computed
    together, from the eigenvalues of their Gram matrices (float32 where that is accurate, else float64, else
    a float64 SVD); they match a float64 SVD to about 1e-5 relative.

    ``num_threads``: torch intra-op threads while computing (restored afterwards; None leaves them as they
    are). One by default: the eigenproblems are a few hundred wide, where LAPACK's threaded reductions gain
    little, and on a shared or busy machine their spin-waiting threads make a call 20-70x slower (measured: a
    batch of six 768x768 eigenproblems, 0.45 s on one thread, 11-34 s on two threads of a loaded two-core
    machine). ``torch.set_num_threads`` is process-wide: torch work in other Python threads is affected too.

    ``stage_map``: the stages rows are grouped by (:func:`tunelens.core.stages.stages`); by default those
    of ``base`` traced on a dummy input when it is a module, the name heuristic
    :func:`tunelens.core.naming.stage_of` for state dicts.
    """
    a, b = as_state_dict(base), as_state_dict(tuned)
    _check_keys(a, b)
    param_names = {n for n, _ in base.named_parameters()} if isinstance(base, nn.Module) else None
    with torch_threads(num_threads):
        if stage_map is None and isinstance(base, nn.Module):
            try:
                stage_map = stages(base)
            except Exception:  # a model no dummy image runs through: group by module names instead
                stage_map = None
        rows = _delta_rows(
            a, b, param_names, include_buffers, stage_map.stage_of if stage_map else stage_of, exact_max_numel
        )
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
        *_SPECTRAL,
        "rank_method",
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
