"""Plain-language findings from result tables, each with its numbers, its uncertainty and its evidence.

Findings are generated, never written by hand: every sentence is formatted from
the tables it cites. Each carries ``evidence`` (the report section / figure anchor
it links to), ``score`` (how much it should lead the list) and, where one is
known, ``uncertainty`` (a confidence interval or the reason there is none).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = ["Finding", "paired_bootstrap_diff", "transfer_findings", "weight_findings", "rank_findings"]


@dataclass
class Finding:
    id: str
    text: str
    evidence: str
    score: float = 0.0
    uncertainty: str | None = None
    kind: str = "result"  # result | caveat

    def to_dict(self) -> dict:
        return asdict(self)


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def paired_bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired samples and its percentile bootstrap CI (resampling samples)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired_bootstrap_diff needs two non-empty arrays of equal length")
    rng = np.random.default_rng(seed)
    d = a - b
    idx = rng.integers(0, len(d), (n_boot, len(d)))
    boots = d[idx].mean(1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)


def transfer_findings(predictions: pd.DataFrame, primary: str = "full", control: str = "scratch") -> list[Finding]:
    """Does pretraining beat training from scratch, and which strategy is best (paired bootstrap over test images)."""
    out = []
    models = list(dict.fromkeys(predictions["model"]))
    acc = predictions.groupby("model", sort=False)["correct"].mean()
    if primary in models and control in models:
        a = predictions[predictions.model == primary].sort_values("index")["correct"].to_numpy()
        b = predictions[predictions.model == control].sort_values("index")["correct"].to_numpy()
        d, lo, hi = paired_bootstrap_diff(a, b)
        verdict = "Pretraining helped" if lo > 0 else ("Pretraining hurt" if hi < 0 else "Pretraining made no clear difference")
        out.append(Finding(
            "transfer", f"{verdict}: fine-tuning from the pretrained weights ({primary}) reaches "
            f"{pct(acc[primary])} target test accuracy against {pct(acc[control])} for the same network trained "
            f"from scratch with the same budget ({100 * d:+.1f} points).", "overview",
            score=10 + abs(d) * 10, uncertainty=f"95% CI of the difference {100 * lo:+.1f} to {100 * hi:+.1f} points "
            f"(paired bootstrap over {len(a)} test images)"))
    tuned = [m for m in models if m not in (control, "base")]
    if len(tuned) > 1:
        best = max(tuned, key=lambda m: acc[m])
        worst = min(tuned, key=lambda m: acc[m])
        a = predictions[predictions.model == best].sort_values("index")["correct"].to_numpy()
        b = predictions[predictions.model == worst].sort_values("index")["correct"].to_numpy()
        d, lo, hi = paired_bootstrap_diff(a, b, seed=1)
        out.append(Finding(
            "best_strategy", f"Of the fine-tuning strategies, {best} scores best ({pct(acc[best])}) and {worst} "
            f"worst ({pct(acc[worst])}), a gap of {100 * d:.1f} points.", "strategies", score=6 + d * 5,
            uncertainty=f"95% CI {100 * lo:+.1f} to {100 * hi:+.1f} points (paired bootstrap)"))
    return out


def weight_findings(stages: pd.DataFrame, primary: str = "full") -> list[Finding]:
    """Which stage moved most under each strategy, relative to the stem; frozen stages that stayed put."""
    out = []
    for model, g in stages.groupby("model", sort=False):
        g = g[g["stage"] != "head"].dropna(subset=["relative"])
        if g.empty:
            continue
        top = g.loc[g["relative"].idxmax()]
        if top["relative"] == 0:
            out.append(Finding(f"weights_frozen_{model}", f"{model}: the backbone did not move at all (every "
                               "shared weight is bit-identical to the pretrained one); only the new head was trained.",
                               "weights", score=3))
            continue
        first = g.sort_values("depth").iloc[0]
        ratio = top["relative"] / first["relative"] if first["relative"] > 0 else float("inf")
        rel_txt = f"{ratio:.1f}x the {first['stage']}'s {pct(first['relative'], 2)}" if np.isfinite(ratio) \
            else f"while the {first['stage']} did not move"
        out.append(Finding(
            f"weights_{model}", f"{model}: {top['stage']} moved most, its weights changed by "
            f"{pct(top['relative'], 2)} of their norm (relative Frobenius), {rel_txt}.", "weights",
            score=(8 if model == primary else 4), uncertainty="exact (computed on the weights, no sampling)"))
    return out


def rank_findings(findings: list[Finding]) -> list[dict]:
    return [f.to_dict() for f in sorted(findings, key=lambda f: -f.score)]
