"""The finding: one generated sentence with its numbers, its uncertainty and its evidence; how findings are
checked and ranked, and the statistics their sentences cite.

Findings are generated, never written by hand: every sentence is formatted from the tables it cites. Each
carries ``evidence`` (the name of the result table it is read from; the report links it to the figure or table
that shows it), ``score`` (how much it should lead the list) and, where one is known, ``uncertainty`` (a
confidence interval or the reason there is none).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Finding", "checked", "paired_bootstrap_diff", "pct", "rank_findings", "span"]


@dataclass(frozen=True)
class Finding:
    """One finding (see the module docstring); ``kind``: ``result`` or ``caveat``."""

    id: str
    text: str
    evidence: str
    score: float = 0.0
    uncertainty: str | None = None
    kind: str = "result"  # result | caveat

    def to_dict(self) -> dict:
        return asdict(self)


def pct(x: float, digits: int = 1) -> str:
    """``x`` (a fraction) as a percentage with ``digits`` decimals."""
    return f"{100 * x:.{digits}f}%"


def span(lo: float, hi: float, fmt: str = ".2f", scale: float = 1.0) -> str:
    """An interval as findings print it: ``"LO to HI"`` with each bound ``scale * bound`` formatted by ``fmt``
    (``".2f"``; ``"+.1f"`` with ``scale=100`` for percentage points). Never ``LO-HI``: with a negative bound
    that reads as a subtraction (``-0.08-0.09``)."""
    return f"{scale * lo:{fmt}} to {scale * hi:{fmt}}"


def paired_bootstrap_diff(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
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


_NONFINITE = re.compile(r"(?<![A-Za-z])(nan|inf)(?![A-Za-z])", re.IGNORECASE)


def checked(f: Finding) -> Finding:
    """``f`` with no ``nan`` or ``inf`` in its sentence or uncertainty: a number that could not be computed is
    replaced by words (the generators avoid them; this is the last guard)."""
    text = _NONFINITE.sub("n/a (not computable)", f.text)
    unc = f.uncertainty
    if unc is not None and _NONFINITE.search(unc):
        unc = "not computable from this little data: " + _NONFINITE.sub("n/a", unc)
    return Finding(f.id, text, f.evidence, f.score, unc, f.kind) if (text, unc) != (f.text, f.uncertainty) else f


def rank_findings(findings: list[Finding]) -> list[dict]:
    return [checked(f).to_dict() for f in sorted(findings, key=lambda f: -f.score)]
