"""The statistics of the attribution study: bootstrap CIs, the calibrated change index and the per-method,
per-class, localisation and faithfulness tables built from the per-image comparisons.

The change index of a method is ``(ceiling - AB) / (ceiling - floor)`` of the mean similarity: 0 = the tuned
model's maps are as close to the base's as the base's own maps under a one-pixel shift or new noise, 1 = as far
as a randomized network's (Adebayo et al. 2018). Values outside [0, 1] are possible: below 0, closer than the
ceiling; above 1, further than the randomized network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from tunelens.analysis.measures.attribution.map_metrics import LOCALISATION, SIMILARITIES

__all__ = ["bootstrap_ci", "change_index"]


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap CI of the mean (NaNs ignored): ``(mean, lo, hi)``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1 or n_boot <= 0:
        return float(v.mean()), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))
    means = v[idx].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def change_index(ab: float, ceiling: float, floor: float) -> float:
    """``(ceiling - ab) / (ceiling - floor)``: 0 = unchanged (as the ceiling), 1 = as different as a random model."""
    gap = ceiling - floor
    return float((ceiling - ab) / gap) if abs(gap) > 1e-12 else float("nan")


def _change_index_ci(
    ab: np.ndarray, ceil: np.ndarray, floor: np.ndarray, n_boot: int, seed: int, alpha: float = 0.05
) -> tuple[float, float]:
    ok = ~(np.isnan(ab) | np.isnan(ceil) | np.isnan(floor))
    ab, ceil, floor = ab[ok], ceil[ok], floor[ok]
    if len(ab) < 2 or n_boot <= 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(ab), (n_boot, len(ab)))
    a, c, f = ab[idx].mean(1), ceil[idx].mean(1), floor[idx].mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ci = (c - a) / (c - f)
    ci = ci[np.isfinite(ci)]
    if not len(ci):
        return float("nan"), float("nan")
    lo, hi = np.quantile(ci, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def summary_table(
    comp: pd.DataFrame,
    methods: Sequence[str],
    similarity: str,
    threshold: float,
    n_boot: int,
    seed: int,
    timings: Mapping[str, float],
) -> pd.DataFrame:
    """Per method: the change index against its ceiling and floor, with bootstrap CIs over images (the study's summary table)."""
    out = []
    for m in methods:
        d = comp[comp["method"] == m]
        ab, ce, fl, ft = (
            d[c].to_numpy(dtype=np.float64)
            for c in (similarity, f"ceiling_{similarity}", f"floor_{similarity}", f"floor_top_{similarity}")
        )
        mab, mce, mfl, mft = np.nanmean(ab), np.nanmean(ce), np.nanmean(fl), np.nanmean(ft)
        lo, hi = _change_index_ci(ab, ce, fl, n_boot, seed)
        row = {
            "method": m,
            "n": len(d),
            "similarity": similarity,
            "ab": mab,
            "ceiling": mce,
            "floor": mfl,
            "floor_top": mft,
            "gap": mce - mfl,
            "gap_top": mce - mft,
            "change_index": change_index(mab, mce, mfl),
            "change_index_lo": lo,
            "change_index_hi": hi,
            "change_index_top": change_index(mab, mce, mft),
            "threshold": threshold,
            "informative": bool(mce - mfl >= threshold and mce - mft >= threshold),
        }
        for s in SIMILARITIES:
            row[f"ab_{s}"] = float(np.nanmean(d[s]))
            for role in ("ceiling", "floor", "floor_top"):
                row[f"{role}_{s}"] = float(np.nanmean(d[f"{role}_{s}"]))
        for c in ("deletion_base", "insertion_base", "deletion_tuned", "insertion_tuned", "mass_base", "mass_tuned"):
            if c in d and d[c].notna().any():
                row[c] = float(np.nanmean(d[c]))
        row["seconds"] = timings.get(m, float("nan")) + timings.get(f"{m}_faithfulness", 0.0)
        out.append(row)
    return pd.DataFrame(out)


def _paired(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    m_a, lo_a, hi_a = bootstrap_ci(a, n_boot, seed)
    m_b, lo_b, hi_b = bootstrap_ci(b, n_boot, seed)
    ok = ~(np.isnan(a) | np.isnan(b))
    m_d, lo_d, hi_d = bootstrap_ci(b[ok] - a[ok], n_boot, seed)
    return {
        "base": m_a,
        "base_lo": lo_a,
        "base_hi": hi_a,
        "tuned": m_b,
        "tuned_lo": lo_b,
        "tuned_hi": hi_b,
        "delta": m_d,
        "delta_lo": lo_d,
        "delta_hi": hi_d,
        "n": int(ok.sum()),
    }


def localisation_table(comp: pd.DataFrame, methods: Sequence[str], n_boot: int, seed: int) -> pd.DataFrame:
    """Per method and model: how much of the attribution falls on the object mask, with bootstrap CIs over images."""
    out = []
    for m in methods:
        d = comp[comp["method"] == m]
        for metric in LOCALISATION:
            out.append(
                {
                    "method": m,
                    "metric": metric,
                    **_paired(d[f"{metric}_base"].to_numpy(float), d[f"{metric}_tuned"].to_numpy(float), n_boot, seed),
                }
            )
    return pd.DataFrame(out)


def faithfulness_table(comp: pd.DataFrame, methods: Sequence[str], n_boot: int, seed: int) -> pd.DataFrame:
    """Per method and model: the deletion / insertion areas, with bootstrap CIs over images."""
    out = []
    for m in methods:
        d = comp[comp["method"] == m]
        for game in ("deletion", "insertion"):
            out.append(
                {
                    "method": m,
                    "game": game,
                    "better": "lower" if game == "deletion" else "higher",
                    **_paired(d[f"{game}_base"].to_numpy(float), d[f"{game}_tuned"].to_numpy(float), n_boot, seed),
                }
            )
    return pd.DataFrame(out)


def per_class_table(
    comp: pd.DataFrame,
    summary: pd.DataFrame,
    methods: Sequence[str],
    similarity: str,
    n_boot: int,
    seed: int,
    with_masks: bool,
) -> pd.DataFrame:
    """Per method and class: the change index with its bootstrap CI (the study's per-class table)."""
    out = []
    for m in methods:
        s = summary[summary["method"] == m].iloc[0]
        d = comp[comp["method"] == m]
        for cls, g in d.groupby("class", sort=True):
            mean, lo, hi = bootstrap_ci(g[similarity].to_numpy(float), n_boot, seed)
            row = {
                "method": m,
                "class": cls,
                "n": len(g),
                "ab": mean,
                "ab_lo": lo,
                "ab_hi": hi,
                "change_index": change_index(mean, s["ceiling"], s["floor"]),
                "base_acc": float((g["base_pred"] == g["label"]).mean()),
                "tuned_acc": float((g["tuned_pred"] == g["label"]).mean()),
            }
            if with_masks:
                p = _paired(g["mass_base"].to_numpy(float), g["mass_tuned"].to_numpy(float), n_boot, seed)
                row.update({f"mass_{kk}": vv for kk, vv in p.items() if kk != "n"})
            out.append(row)
    return pd.DataFrame(out)
