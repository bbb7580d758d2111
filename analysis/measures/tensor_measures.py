"""Measures of one weight tensor's update ``dW = W1 - W0``, computed from float32 copies of the stored tensors.

Entry-wise (one pass over the tensor in chunks, sums accumulated in float64, :func:`entry_stats`):

* ``norm_base`` ||W0||_F, ``norm_tuned`` ||W1||_F, ``frobenius`` ||dW||_F, ``relative`` ||dW||_F / ||W0||_F;
* ``cosine`` <W0, W1> / (||W0||_F ||W1||_F); ``max_abs`` max |dW|;
* ``changed_share``: the share of entries changed beyond the rounding of the stored dtype, i.e. with
  ``|dW_ij| > (eps / 2) * |W0_ij|``, ``eps = torch.finfo(stored dtype).eps`` (the distance from 1 to the next
  representable number: 2^-7 for bfloat16, 2^-10 for float16, 2^-23 for float32). ``(eps / 2) |x|`` bounds the
  error of rounding ``x`` to that dtype (half a unit in the last place), so an entry counted as changed differs by
  more than storing it could explain; for bfloat16 or float16 weights stored in the same dtype, every entry that
  changed at all is counted (a change is at least one unit). An entry with ``W0_ij = 0`` counts when
  ``dW_ij != 0``. The update's *sparsity* is ``1 - changed_share``.

Spectral, on the update as a matrix (conv kernels ``out x in*k*k``; :func:`update_spectrum`,
:func:`spectral_stats`), from the singular values ``s_1 >= s_2 >= ...`` of ``dW``:

* ``spectral`` s_1; ``stable_rank`` ||dW||_F^2 / s_1^2 (Rudelson and Vershynin 2007), with the exact
  Frobenius norm; ``top1_energy`` s_1^2 / ||dW||_F^2;
* ``effective_rank`` exp(H(p)), ``p_i = s_i / sum_j s_j`` (Roy and Vetterli 2007);
* ``numerical_rank``: how many ``s_i > max(rows, cols) * eps_float32 * s_1`` (the usual rank tolerance of the
  float32 arithmetic ``dW`` is formed in); from the top ``K`` only, it is at most ``K``;
* ``rank_method``: ``exact`` (all singular values, float64 ``svdvals``) for matrices of at most
  ``exact_max_numel`` entries; above that ``top-K`` (:func:`randomized_svd`, the top ``K`` singular values):
  ``stable_rank`` is then exact up to s_1's accuracy, while ``effective_rank`` is that of the best rank-``K``
  approximation (at most ``K``; exact when the update's rank is below ``K``) and ``spectrum_energy``
  (sum of the ``K`` computed s_i^2 over ||dW||_F^2) says how much of the update those ``K`` directions hold.

:func:`randomized_svd` is Halko, Martinsson and Tropp (2011), "Finding structure with randomness", Algorithm
4.4 (randomized subspace iteration, re-orthonormalised after each product), with a Gaussian test matrix drawn
from a seeded CPU generator, so results do not depend on the device's random stream or on other tensors.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator

import torch

__all__ = [
    "EXACT_MAX_NUMEL",
    "bit_identical",
    "entry_stats",
    "name_seed",
    "randomized_svd",
    "spectral_stats",
    "top_left_vectors",
    "update_spectrum",
]

#: The in-memory analyses' (weights, intruders) size above which a matrix gets randomized top-k singular values and
#: vectors instead of all of them, exactly: 2M entries (vit_b_16's 768 x 3072 MLP matrices, resnet50's layer4 3x3
#: convolutions and vgg's classifier are above; every matrix of EfficientNet-Lite0 and MiniLM below).
EXACT_MAX_NUMEL = 1 << 21
CHUNK = 1 << 20  # entries per chunk of the entry-wise pass and of blockwise products (8 MiB in float64)


def name_seed(name: str) -> int:
    """The seed of a tensor's randomized spectra, from its name: a row depends on its tensor only."""
    return zlib.crc32(name.encode("utf-8"))


def bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two stored tensors have the same dtype, shape and bytes (NaNs with equal bits are identical)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def entry_stats(w0: torch.Tensor, d: torch.Tensor, stored: torch.dtype) -> dict[str, float]:
    """The entry-wise measures of the module docstring for ``W0 = w0`` (any float dtype, e.g. as stored) and
    ``dW = d`` (float32, same number of entries), the tensor stored as ``stored``; one pass in chunks of
    :data:`CHUNK` entries with float64 sums (``||W1||^2 = ||W0||^2 + 2 <W0, dW> + ||dW||^2``)."""
    a, b = w0.reshape(-1), d.reshape(-1)
    half = 0.5 * (torch.finfo(stored).eps if stored.is_floating_point else 0.0)
    s00 = s0d = sdd = 0.0
    mx, changed = 0.0, 0
    for i in range(0, a.numel(), CHUNK):
        x, dx = a[i : i + CHUNK].double(), b[i : i + CHUNK].double()
        s00 += float(torch.dot(x, x))
        s0d += float(torch.dot(x, dx))
        sdd += float(torch.dot(dx, dx))
        ad = dx.abs_()
        mx = max(mx, float(ad.max()))
        changed += int((ad > x.abs_().mul_(half)).sum())
    s11 = s00 + 2 * s0d + sdd
    n0, n1, nd = math.sqrt(s00), math.sqrt(max(s11, 0.0)), math.sqrt(sdd)
    finite = math.isfinite(sdd) and math.isfinite(s00)
    return {
        "norm_base": n0,
        "norm_tuned": n1,
        "frobenius": nd,
        "relative": nd / n0 if n0 > 0 else (0.0 if nd == 0 else math.inf),
        "cosine": min(1.0, max(-1.0, (s00 + s0d) / (n0 * n1))) if n0 > 0 and n1 > 0 and finite else math.nan,
        "max_abs": mx,
        "changed_share": changed / a.numel() if a.numel() else 0.0,
    }


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread for a block: LAPACK's factorizations of thin matrices gain nothing from threads, and on
    a busy machine their spin-waiting threads make them 100x slower (measured: a 5632 x 40 QR, 0.002 s on one
    thread, 0.8 s on two threads of a loaded two-core machine)."""
    prev = torch.get_num_threads()
    if prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _mm(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m @ x`` in ``x``'s dtype; a matrix ``m`` of another dtype is converted one block of rows at a time."""
    if m.dtype == x.dtype:
        return m @ x
    rows = max(1, CHUNK // max(1, m.shape[1]))
    return torch.cat([m[i : i + rows].to(x.dtype) @ x for i in range(0, m.shape[0], rows)])


def _tmm(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``m.T @ q`` in ``q``'s dtype, blockwise like :func:`_mm`."""
    if m.dtype == q.dtype:
        return m.T @ q
    rows = max(1, CHUNK // max(1, m.shape[1]))
    out = torch.zeros(m.shape[1], q.shape[1], dtype=q.dtype, device=q.device)
    for i in range(0, m.shape[0], rows):
        out += m[i : i + rows].to(q.dtype).T @ q[i : i + rows]
    return out


def randomized_svd(
    m: torch.Tensor, k: int, *, oversample: int = 8, niter: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` left singular vectors (``rows x k``) and singular values (descending) of matrix ``m``,
    float32 on ``m``'s device (Halko et al. 2011, Algorithm 4.4: ``k + oversample`` Gaussian probes, ``niter``
    subspace iterations with a QR after every product). A matrix stored in another dtype (bfloat16) is
    converted block by block inside the products, never whole."""
    rows, cols = m.shape
    probes = min(k + oversample, rows, cols)
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(cols, probes, generator=g, dtype=torch.float32).to(m.device)
    y = _mm(m, omega)
    with _one_thread():
        q = torch.linalg.qr(y).Q
    for _ in range(niter):
        z = _tmm(m, q)
        with _one_thread():
            z = torch.linalg.qr(z).Q
        y = _mm(m, z)
        with _one_thread():
            q = torch.linalg.qr(y).Q
    bt = _tmm(m, q)  # B^T = m^T Q, cols x l: B = Q^T m = Ub S Vb^T
    with _one_thread():
        _, s, ubt = torch.linalg.svd(bt, full_matrices=False)  # B^T = Vb S Ub^T
    kk = min(k, s.numel())
    return q @ ubt.T[:, :kk], s[:kk]


def top_left_vectors(m: torch.Tensor, k: int, *, seed: int = 0, niter: int = 2) -> torch.Tensor:
    """The top-``k`` left singular vectors of ``m`` (columns), from :func:`randomized_svd`."""
    return randomized_svd(m, k, seed=seed, niter=niter)[0]


def update_spectrum(
    d: torch.Tensor, *, exact_max_numel: int, k: int = 32, seed: int = 0, niter: int = 2
) -> tuple[torch.Tensor, str]:
    """Singular values (float64, CPU, descending) of ``d`` as a matrix (``out x rest``) and how they were found:
    ``exact`` when ``d`` has at most ``exact_max_numel`` entries (all of them), else ``top-k`` (the top ``k``)."""
    m = d.reshape(d.shape[0], -1)
    if m.numel() <= exact_max_numel:
        with _one_thread():
            return torch.linalg.svdvals(m.double()).cpu(), "exact"
    return randomized_svd(m, k, seed=seed, niter=niter)[1].double().cpu(), f"top-{k}"


def spectral_stats(s: torch.Tensor, fro2: float, shape: tuple[int, int] = (1, 1)) -> dict[str, float]:
    """``spectral``, ``stable_rank``, ``effective_rank``, ``numerical_rank``, ``top1_energy`` and
    ``spectrum_energy`` (module docstring) from singular values ``s`` (descending, possibly only the top ones) of
    a ``shape`` matrix and ``fro2 = ||dW||_F^2``. A zero update has NaN ranks (0/0) and numerical rank 0."""
    if fro2 == 0.0 or s.numel() == 0 or float(s[0]) == 0.0:
        nan = math.nan
        return {
            "spectral": 0.0,
            "stable_rank": nan,
            "effective_rank": nan,
            "numerical_rank": 0,
            "top1_energy": nan,
            "spectrum_energy": nan,
        }
    s1 = float(s[0])
    tol = max(shape) * torch.finfo(torch.float32).eps * s1
    p = s / s.sum()
    p = p[p > 0]
    return {
        "spectral": s1,
        "stable_rank": fro2 / s1**2,
        "effective_rank": float(torch.exp(-(p * p.log()).sum())),
        "numerical_rank": int((s > tol).sum()),
        "top1_energy": s1**2 / fro2,
        "spectrum_energy": min(1.0, float((s**2).sum()) / fro2),
    }
