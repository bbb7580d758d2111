"""Linear CKA: in memory (:func:`linear_cka`) and streamed over minibatches (:class:`StreamingCKA`).

Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited") of
features ``X`` (n x p) and ``Y`` (n x q), rows = samples, centred::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),

with Gram matrices ``K = X X^T``, ``L = Y Y^T``. The *biased* HSIC is ``HSIC_0 = tr(K H L H) / (n-1)^2``
(Gretton et al. 2005, ``H = I - 11^T/n``). The *unbiased* HSIC_1 of Song et al. (2012) is computed here in
the U-centred form of Szekely and Rizzo (2014): with ``K~`` = K with its diagonal zeroed, row sums ``r``
and total ``s``, ``U(K)_ij = K~_ij - r_i/(n-2) - r_j/(n-2) + s/((n-1)(n-2))`` (``U(K)_ii = 0``) and
``HSIC_1(K, L) = <U(K), U(L)> / (n(n-3))`` -- algebraically Song's estimator, without its cancelling
sums. Minibatch CKA (Nguyen, Raghu and Kornblith 2021) sums ``HSIC_1`` over batches and takes the
ratio at the end, so memory does not depend on the number of samples; an unbiased estimator makes the
sum over batches unbiased, whereas summed biased HSIC keeps each batch's bias (independent data gives
CKA >> 0). Everything is float64. Nothing is clamped and no epsilon is added: negative unbiased
estimates stay; a zero self-HSIC (features constant across samples) gives NaN with a reason.

CKA between the layers of two models (one pass over the data, read against chance) is
:mod:`tunelens.analysis.measures.cka_models`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

__all__ = ["MIN_BATCH", "StreamingCKA", "estimator_name", "linear_cka"]

MIN_BATCH = 4  # HSIC_1 divides by n(n-3); both estimators use the same batches so they stay comparable
# A self-HSIC counts as zero when ||centred Gram||_F <= _DEGENERATE * ||Gram||_F (float64 rounding of the
# centring; it happens for features that are constant across samples). It is a test, never an epsilon.
_DEGENERATE = 1e-10


def estimator_name(debiased: bool, minibatch: bool = False) -> str:
    """The label attached to every CKA number: which HSIC estimator, and whether summed over minibatches."""
    est = "unbiased HSIC_1 (Song 2012, U-centred)" if debiased else "biased HSIC_0 (Gretton 2005)"
    return f"{'minibatch ' if minibatch else ''}linear CKA, {est}"


def _features64(a: Any) -> torch.Tensor:
    t = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if t.dim() == 0:
        raise ValueError("features must have a sample dimension first")
    t = t.reshape(t.shape[0], -1) if t.dim() != 1 else t[:, None]
    return t.to(torch.float64)


def _centre_gram_(k: torch.Tensor, debiased: bool) -> torch.Tensor:
    """Centre an n x n Gram matrix in place: U-centring (debiased) or double centring ``HKH``."""
    n = k.shape[0]
    if debiased:
        k.fill_diagonal_(0.0)
        r = k.sum(0) / (n - 2)
        r -= r.sum() / (2 * (n - 1))
        k -= r[:, None]
        k -= r[None, :]
        k.fill_diagonal_(0.0)
    else:
        r = k.mean(0)
        k -= r[:, None]
        k -= r[None, :]
        k += r.mean()
    return k


def linear_cka(x: Any, y: Any, debiased: bool = False) -> float:
    """Linear CKA of two feature sets held in memory (torch tensors or numpy arrays; conv features flattened).

    ``debiased=False``: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` (Kornblith et al. 2019), in
    feature space or Gram space, whichever is cheaper. ``debiased=True``: the unbiased HSIC_1 (Song et al.
    2012) in U-centred form, which needs the n x n Gram matrices (use :class:`StreamingCKA` for large n).
    Float64 throughout; :func:`estimator_name` ``(debiased)`` names the estimator. NaN, with a
    ``RuntimeWarning`` that gives the reason, when a self-similarity is zero.
    """
    X, Y = _features64(x), _features64(y)
    if Y.device != X.device:
        Y = Y.to(X.device)
    n = X.shape[0]
    if Y.shape[0] != n:
        raise ValueError(f"x and y must have the same number of samples (rows), got {n} and {Y.shape[0]}")
    need = MIN_BATCH if debiased else 2
    if n < need:
        raise ValueError(f"linear_cka needs at least {need} samples with debiased={debiased}, got {n}")
    if debiased:
        K, L = X @ X.T, Y @ Y.T
        scale = [float(torch.linalg.matrix_norm(g - torch.diag(torch.diagonal(g)))) for g in (K, L)]
        K, L = _centre_gram_(K, True), _centre_gram_(L, True)
        num, sx, sy = float((K * L).sum()), float(torch.linalg.matrix_norm(K)), float(torch.linalg.matrix_norm(L))
    else:
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        p, q = X.shape[1], Y.shape[1]
        if p * q + p * p + q * q <= n * (p + q + n):
            num = float(torch.linalg.matrix_norm(Yc.T @ Xc)) ** 2
            sx, sy = float(torch.linalg.matrix_norm(Xc.T @ Xc)), float(torch.linalg.matrix_norm(Yc.T @ Yc))
            scale = [float(torch.linalg.matrix_norm(X.T @ X)), float(torch.linalg.matrix_norm(Y.T @ Y))]
        else:
            K, L = Xc @ Xc.T, Yc @ Yc.T
            num, sx, sy = float((K * L).sum()), float(torch.linalg.matrix_norm(K)), float(torch.linalg.matrix_norm(L))
            scale = [float(torch.linalg.matrix_norm(X @ X.T)), float(torch.linalg.matrix_norm(Y @ Y.T))]
    bad = [w for w, s, ref in (("x", sx, scale[0]), ("y", sy, scale[1])) if not s > _DEGENERATE * ref]
    if bad:
        reason = (
            f"self-similarity of {' and '.join(bad)} is zero (features constant across the {n} samples); "
            "CKA is undefined"
        )
        warnings.warn(f"linear_cka: NaN: {reason}", RuntimeWarning, stacklevel=2)
        return float("nan")
    return num / (sx * sy)


class StreamingCKA:
    """Minibatch linear CKA for every (A layer, B layer) pair, plus A x A and B x B, torchmetrics style.

    ``update(feats_a, feats_b)`` takes ``{layer: batch tensor}`` for each model (batch first, any trailing
    shape); :meth:`update_grams` takes Gram matrices formed elsewhere (inside hooks). Per batch each
    layer's float64 Gram is centred once (U-centring for ``debiased=True``), the centred Grams of all
    ``La + Lb`` layers are stacked as rows of an ``(La+Lb) x n^2`` matrix and one matmul gives every
    pair's HSIC, which is summed over batches. :meth:`compute` returns ``CKA = sum HSIC_ab /
    sqrt(sum HSIC_aa sum HSIC_bb)``; under ``torch.distributed`` the sums are all-reduced first, so a run
    sharded *by batch* equals the single-process run. Memory: O((La+Lb)^2) accumulators plus
    O(batches) floats per diagonal pair for :meth:`bootstrap_diagonal`, never O(samples).
    Batches of fewer than 4 samples are skipped with a warning and counted.
    """

    def __init__(
        self,
        layers_a: Sequence[str] | None = None,
        layers_b: Sequence[str] | None = None,
        *,
        debiased: bool = True,
        pairs: Sequence[tuple[str, str]] | None = None,
        keep_batches: bool = True,
    ) -> None:
        self.debiased = debiased
        self.estimator = estimator_name(debiased, minibatch=True)
        self.keep_batches = keep_batches
        self._init: tuple[list[str] | None, list[str] | None, list[tuple[str, str]] | None] = (
            list(layers_a) if layers_a is not None else None,
            list(layers_b) if layers_b is not None else None,
            list(pairs) if pairs is not None else None,
        )
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        la, lb, pairs = self._init
        self.layers_a: list[str] | None = copy.copy(la)
        self.layers_b: list[str] | None = copy.copy(lb)
        self._pairs: list[tuple[str, str]] | None = copy.copy(pairs)
        self._ip: torch.Tensor | None = None  # (L, L) sum over batches of HSIC(K_i, K_j)
        self._scale: torch.Tensor | None = None  # (L,) same normalisation, uncentred Grams (degeneracy test)
        self._records: list[torch.Tensor] = []  # per batch: diagonal pairs' HSIC, then every self-HSIC
        self.n_samples = self.n_batches = self.skipped_samples = self.skipped_batches = 0
        self._summary: dict[str, Any] | None = None

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Diagonal pairs: given, else layers with the same name in A and B, else A[i] with B[i] when equally many."""
        if self._pairs is not None:
            return self._pairs
        if self.layers_a is None or self.layers_b is None:
            return []
        common = [n for n in self.layers_a if n in set(self.layers_b)]
        if common:
            return [(n, n) for n in common]
        return list(zip(self.layers_a, self.layers_b, strict=False)) if len(self.layers_a) == len(self.layers_b) else []

    def update(self, feats_a: Mapping[str, torch.Tensor], feats_b: Mapping[str, torch.Tensor]) -> None:
        """Add one batch of features (the same samples, in the same order, for both models)."""

        def grams(f: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = {}
            for k, v in f.items():
                x = _features64(v)
                out[k] = x @ x.T
            return out

        self.update_grams(grams(feats_a), grams(feats_b))

    def update_grams(self, grams_a: Mapping[str, torch.Tensor], grams_b: Mapping[str, torch.Tensor]) -> None:
        """Add one batch given each layer's n x n Gram matrix ``X X^T`` (not modified)."""
        if self.layers_a is None:
            self.layers_a = list(grams_a)
        if self.layers_b is None:
            self.layers_b = list(grams_b)
        for side, names, g in (("A", self.layers_a, grams_a), ("B", self.layers_b, grams_b)):
            if set(g) != set(names):
                raise KeyError(f"model {side} layers {sorted(g)} differ from the first batch's {sorted(names)}")
        if self._pairs is not None:
            bad = [p for p in self._pairs if p[0] not in self.layers_a or p[1] not in self.layers_b]
            if bad:
                raise KeyError(f"diagonal pairs {bad} name layers that are not captured")
        Ks = [grams_a[k] for k in self.layers_a] + [grams_b[k] for k in self.layers_b]
        n = Ks[0].shape[0]
        if any(K.shape != (n, n) for K in Ks):
            raise ValueError(f"every Gram matrix of a batch must be {n} x {n}: {[tuple(K.shape) for K in Ks]}")
        if n < MIN_BATCH:
            self.skipped_samples += n
            self.skipped_batches += 1
            warnings.warn(
                f"StreamingCKA: skipped a batch of {n} samples: the unbiased HSIC estimator divides by "
                f"n(n-3) and needs n >= {MIN_BATCH} (both estimators skip it so they stay comparable)",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        L = len(Ks)
        U = torch.empty((L, n * n), dtype=torch.float64, device=Ks[0].device)
        scale = torch.empty(L, dtype=torch.float64, device=U.device)
        for i, K in enumerate(Ks):
            u = U[i].view(n, n)
            u.copy_(K)
            if self.debiased:
                u.fill_diagonal_(0.0)
            scale[i] = torch.dot(U[i], U[i])
            _centre_gram_(u, self.debiased)
        norm = 1.0 / (n * (n - 3)) if self.debiased else 1.0 / (n - 1) ** 2
        ip = (U @ U.T) * norm
        scale *= norm
        if self._ip is None or self._scale is None:
            self._ip, self._scale = ip, scale
        else:
            self._ip += ip
            self._scale += scale
        if self.keep_batches:
            ia = {k: i for i, k in enumerate(self.layer_lists()[0])}
            ib = {k: len(ia) + i for i, k in enumerate(self.layer_lists()[1])}
            cross = ip[[ia[a] for a, _ in self.pairs], [ib[b] for _, b in self.pairs]]
            self._records.append(torch.cat([cross, torch.diagonal(ip)]))
        self.n_samples += n
        self.n_batches += 1

    def _synced(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, int], np.ndarray]:
        """Accumulators summed over ranks (collective when distributed), batch records gathered."""
        if self.layers_a is None or self.layers_b is None:
            raise ValueError("StreamingCKA.compute() called before any update()")
        L = len(self.layers_a) + len(self.layers_b)
        ip = self._ip.clone() if self._ip is not None else torch.zeros((L, L), dtype=torch.float64)
        scale = self._scale.clone() if self._scale is not None else torch.zeros(L, dtype=torch.float64)
        counts = torch.tensor(
            [self.n_samples, self.n_batches, self.skipped_samples, self.skipped_batches], dtype=torch.float64
        )
        recs = torch.stack(self._records).cpu().numpy() if self._records else np.zeros((0, len(self.pairs) + L))
        if dist.is_available() and dist.is_initialized():
            nccl = dist.get_backend() == "nccl"
            dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            flat = torch.cat([ip.flatten(), scale, counts.to(ip.device)]).to(dev)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat = flat.to(ip.device)
            ip, scale, counts = flat[: L * L].view(L, L), flat[L * L : L * L + L], flat[L * L + L :]
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, recs)
            recs = np.concatenate(parts, axis=0)
        c = [int(round(float(v))) for v in counts.cpu()]
        info = {"n_samples": c[0], "n_batches": c[1], "skipped_samples": c[2], "skipped_batches": c[3]}
        if info["n_batches"] == 0:
            raise ValueError(
                f"StreamingCKA: no batch had at least {MIN_BATCH} samples ({info['skipped_samples']} "
                f"samples in {info['skipped_batches']} batches were skipped); use a larger batch size"
            )
        # canonical row order: the bootstrap no longer depends on batch order or on how ranks were sharded
        recs = recs[np.lexsort(recs.T[::-1])] if len(recs) else recs
        return ip.cpu(), scale.cpu(), info, recs

    def layer_lists(self) -> tuple[list[str], list[str]]:
        """The layers of model A and of model B that the pairs name, each in first-seen order."""
        if self.layers_a is None or self.layers_b is None:
            raise ValueError("StreamingCKA.compute() called before any update()")
        return self.layers_a, self.layers_b

    def _frames(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, int], np.ndarray]:
        ip, scale, info, recs = self._synced()
        la, lb = self.layer_lists()
        d = torch.diagonal(ip).clone()
        names = [f"A:{k}" for k in la] + [f"B:{k}" for k in lb]
        reasons = {}
        for i, nm in enumerate(names):
            if not float(d[i]) > _DEGENERATE**2 * float(scale[i]):
                reasons[nm] = (
                    f"self-HSIC of {nm} is {float(d[i]):.3g} (zero up to rounding: features constant "
                    "across samples); its CKA row/column is NaN"
                )
                d[i] = float("nan")
        if reasons:
            warnings.warn("StreamingCKA: " + "; ".join(reasons.values()), RuntimeWarning, stacklevel=3)
        C = (ip / torch.sqrt(d[:, None] * d[None, :])).numpy()
        A = len(la)
        attrs = dict(info, estimator=self.estimator, nan_reasons=reasons)
        out = []
        for block, rows, cols, rn, cn in (
            (C[:A, A:], la, lb, "layer_a", "layer_b"),
            (C[:A, :A], la, la, "layer_a", "layer_a"),
            (C[A:, A:], lb, lb, "layer_b", "layer_b"),
        ):
            out.append(pd.DataFrame(block.copy(), index=pd.Index(rows, name=rn), columns=pd.Index(cols, name=cn)))
        self._summary = copy.deepcopy(attrs)
        return out[0], out[1], out[2], info, recs

    def summary(self) -> dict[str, Any]:
        """What the last :meth:`compute` rests on: ``estimator``, ``n_samples``, ``n_batches``,
        ``skipped_samples``, ``skipped_batches`` and ``nan_reasons`` (why a layer's CKA is NaN)."""
        if self._summary is None:
            self._frames()
        return copy.deepcopy(self._summary or {})

    def compute(self) -> pd.DataFrame:
        """A x B CKA: index = A's layers, columns = B's (counts and the estimator: :meth:`summary`)."""
        return self._frames()[0]

    def compute_all(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """``(A x B, A x A, B x B)`` CKA matrices from the same accumulators."""
        ab, aa, bb, _, _ = self._frames()
        return ab, aa, bb

    def bootstrap_diagonal(self, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
        """Per diagonal pair: CKA and a percentile bootstrap CI over *batches* (resampled with replacement,
        ratio of sums recomputed), seeded. Columns ``layer_a, layer_b, cka, ci_low, ci_high, n_batches,
        estimator``. The CI is NaN with fewer than 2 batches (or without ``keep_batches``)."""
        ab, _, _, info, recs = self._frames()
        la, lb = self.layer_lists()
        pairs, A = self.pairs, len(la)
        ia = {k: i for i, k in enumerate(la)}
        ib = {k: i for i, k in enumerate(lb)}
        P = len(pairs)
        lo = np.full(P, np.nan)
        hi = np.full(P, np.nan)
        if self.keep_batches and len(recs) >= 2 and P:
            rng = np.random.default_rng(seed)
            idx = rng.integers(0, len(recs), size=(n_boot, len(recs)))
            sums = np.zeros((n_boot, recs.shape[1]))
            for j in range(len(recs)):  # loop over draws: O(n_boot x columns) memory
                sums += recs[idx[:, j]]
            for p, (a, b) in enumerate(pairs):
                saa, sbb = sums[:, P + ia[a]], sums[:, P + A + ib[b]]
                with np.errstate(invalid="ignore", divide="ignore"):
                    r = np.where((saa > 0) & (sbb > 0), sums[:, p] / np.sqrt(saa * sbb), np.nan)
                if np.isfinite(ab.loc[a, b]) and np.isfinite(r).any():
                    lo[p], hi[p] = np.nanpercentile(r, [50 * (1 - ci), 50 * (1 + ci)])
        df = pd.DataFrame(
            {
                "layer_a": [a for a, _ in pairs],
                "layer_b": [b for _, b in pairs],
                "cka": [float(ab.loc[a, b]) for a, b in pairs],
                "ci_low": lo,
                "ci_high": hi,
                "n_batches": info["n_batches"],
                "estimator": self.estimator,
            }
        )
        return df
