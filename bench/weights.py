"""Benchmark of :func:`tunelens.analysis.measures.weights.weight_deltas` against the implementation it replaced.

    python bench/weights.py [--models convnext_tiny resnet50] [--repeats 1] [--threads N]
                            [--out artifacts/bench/weights.json]

For each torchvision model (random weights, ``weights=None``, seed 0) a "tuned" copy is made: every
parameter and BatchNorm running statistic + 1e-2 * randn * its std (seed 1; constant tensors such as
ConvNeXt's layer scales stay unchanged), and the 1000-class head replaced by a 10-class one so the
``replaced`` rows are exercised. The previous implementation (kept below as
:func:`reference_weight_deltas`: one float64 ``svdvals`` per matrix) and the current one are timed
alternately in the same process, wall clock and process CPU time (median over ``--repeats``).
Target: reference / new >= 8 on convnext_tiny.

The new implementation runs on one torch thread by default (``num_threads=1``); the reference runs with the
process's threads as it always did. To separate that from the algorithmic gain (Gram eigenvalues of the
short side, float32 where accurate, batched by shape), the reference is also timed on one thread
(``reference_1thread``, ``ratio_*_1thread``).

Numbers compared, for every numeric column (norm_base, frobenius, relative, cosine, max_abs, spectral,
stable_rank, effective_rank, top1_energy) over the same rows: NaN in the same places, and
``max |new - ref| / max(1, |ref|)``, i.e. the absolute difference for values up to 1 and the relative one
above (effective ranks run in the hundreds). Target: <= 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import torch
from torch import nn

from bench._common import machine_info, paired_ratio, set_threads, time_interleaved, write_json
from tunelens.analysis.measures.weights import _BN_STATS, _check_keys, as_state_dict, weight_deltas
from tunelens.core.naming import stage_of
from tunelens.core.runtime import torch_threads

NUMERIC = [
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


# ---- reference: analysis/weights.py before the batched Gram-eigenvalue version (verbatim) ----
def _reference_matrix_stats(d: torch.Tensor) -> dict[str, float]:
    m = d.reshape(d.shape[0], -1).double()
    if not bool(torch.isfinite(m).all()):
        nan = float("nan")
        return {"spectral": nan, "stable_rank": nan, "effective_rank": nan, "top1_energy": nan}
    if m.shape[1] > m.shape[0]:
        m = m.T  # same singular values; LAPACK is far faster on tall matrices than on wide ones
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


def reference_weight_deltas(
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
            row.update(_reference_matrix_stats(d))
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


# ---- benchmark ----


def make_pair(arch: str) -> tuple[nn.Module, nn.Module]:
    """``(base, tuned)``: random ``arch`` and a perturbed copy with a 10-class head."""
    import torchvision

    torch.manual_seed(0)
    base = getattr(torchvision.models, arch)(weights=None).eval()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in list(tuned.parameters()) + [b for n, b in tuned.named_buffers() if n.endswith(_BN_STATS)]:
            if t.numel() > 1:
                t.add_(1e-2 * torch.randn(t.shape, generator=g) * t.std())
    if arch.startswith("resnet"):
        tuned.fc = nn.Linear(tuned.fc.in_features, 10)
    else:
        tuned.classifier[-1] = nn.Linear(tuned.classifier[-1].in_features, 10)
    return base, tuned


def compare(ref: pd.DataFrame, new: pd.DataFrame) -> dict[str, float]:
    """Per numeric column, ``max |new - ref| / max(1, |ref|)``; raises if rows or NaN positions differ."""
    assert list(ref["name"]) == list(new["name"]), "rows differ"
    assert (ref["status"].fillna("") == new["status"].fillna("")).all(), "status differs"
    out = {}
    for c in NUMERIC:
        r, n = ref[c].to_numpy(float), new[c].to_numpy(float)
        assert (np.isnan(r) == np.isnan(n)).all(), f"NaN positions differ in {c}"
        ok = ~np.isnan(r)
        out[c] = float((np.abs(n[ok] - r[ok]) / np.maximum(1.0, np.abs(r[ok]))).max()) if ok.any() else 0.0
    return out


def _one_thread_reference(base: nn.Module, tuned: nn.Module) -> pd.DataFrame:
    with torch_threads(1):
        return reference_weight_deltas(base, tuned)


def bench_model(arch: str, repeats: int) -> dict:
    base, tuned = make_pair(arch)
    res: dict[str, pd.DataFrame] = {}
    t = time_interleaved(
        {
            "reference": lambda: res.__setitem__("reference", reference_weight_deltas(base, tuned)),
            "new": lambda: res.__setitem__("new", weight_deltas(base, tuned)),
            "reference_1thread": lambda: res.__setitem__("reference_1thread", _one_thread_reference(base, tuned)),
        },
        repeats=repeats,
        warmup=0,
    )
    diff = compare(res["reference"], res["new"])
    assert max(compare(res["reference"], res["reference_1thread"]).values()) < 1e-9
    ref = res["reference"]
    return {
        "rows": len(ref),
        "matrices": int(((ref["kind"] == "weight") & (ref["status"] == "compared")).sum()),
        "replaced": int((ref["status"] == "replaced").sum()),
        "reference_s": t["reference"]["median"],
        "new_s": t["new"]["median"],
        "ratio_wall": paired_ratio(t, "reference", "new"),
        "reference_cpu_s": t["reference"]["cpu_median"],
        "new_cpu_s": t["new"]["cpu_median"],
        "ratio_cpu": paired_ratio(t, "reference", "new", key="cpu_times"),
        "reference_1thread_s": t["reference_1thread"]["median"],
        "reference_1thread_cpu_s": t["reference_1thread"]["cpu_median"],
        "ratio_wall_1thread": paired_ratio(t, "reference_1thread", "new"),
        "ratio_cpu_1thread": paired_ratio(t, "reference_1thread", "new", key="cpu_times"),
        "max_diff": max(diff.values()),
        "max_diff_by_column": diff,
        "timings": t,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["convnext_tiny", "resnet50"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: as is)")
    ap.add_argument("--out", default="artifacts/bench/weights.json")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    out: dict = {"machine": machine_info(), "models": {}}
    for arch in args.models:
        r = bench_model(arch, args.repeats)
        out["models"][arch] = r
        print(
            f"{arch}: {r['matrices']} matrices, {r['replaced']} replaced | reference {r['reference_s']:.2f} s, "
            f"new {r['new_s']:.2f} s, speed-up x{r['ratio_wall']:.1f} wall "
            f"(CPU {r['reference_cpu_s']:.2f} s / {r['new_cpu_s']:.2f} s = x{r['ratio_cpu']:.1f}) | "
            f"max diff {r['max_diff']:.2e} | reference on one thread {r['reference_1thread_s']:.2f} s "
            f"(x{r['ratio_wall_1thread']:.1f} wall, x{r['ratio_cpu_1thread']:.1f} CPU)",
            flush=True,
        )
    out["machine"]["loadavg_1m_end"] = machine_info().get("loadavg_1m")
    print("wrote", write_json(args.out, out))
    return out


if __name__ == "__main__":
    main()
