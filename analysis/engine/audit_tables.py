"""The streaming audit's table turned into the report's tables and findings: per layer, per module kind, the
pairing of names, and the facts worth reading first.

Aggregates of a group of tensors (compared, floating point):

* ``relative`` sqrt(sum ||dW||_F^2) / sqrt(sum ||W0||_F^2), as :func:`tunelens.analysis.weights.aggregate_deltas`;
  ``mean_relative`` the unweighted mean, ``min_cosine`` the smallest cosine;
* ``identical`` how many tensors are bit-identical; ``changed_share`` the share of all the group's entries
  changed beyond rounding (entries pooled);
* ``mean_stable_rank`` and ``mean_effective_rank`` over the group's changed weight matrices;
* ``intruders`` summed over matrices, ``intruder_k`` the directions examined.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..findings import Finding, pct
from ..io.tensor_pairing import Pairing

__all__ = ["AUDIT_TABLES", "aggregate_audit", "audit_findings", "pairing_table", "submodule_table"]

#: The tables ``tunelens weights`` writes (its report's sections read them; it runs outside the step registry).
AUDIT_TABLES = ("weight_deltas", "weight_stages", "weight_kinds", "weight_submodules", "weight_pairing")


def aggregate_audit(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """Aggregate the per-tensor table by ``by`` (``stage`` or ``module_kind``), in depth order; with a
    ``model`` column, per model as well. Columns: those of :func:`tunelens.analysis.weights.aggregate_deltas`
    (``tensors``, ``numel``, ``replaced``, ``frobenius``, ``relative``, ``mean_relative``, ``min_cosine``) and
    the module docstring's."""
    keys = (["model"] if "model" in df.columns else []) + [by]
    out = []
    for key, g in df.groupby(keys, sort=False):
        c = g[g["status"] == "compared"]
        w = c[(c["kind"] == "weight") & ~c["identical"].astype(bool)]
        num = float(np.sqrt((c["frobenius"] ** 2).sum()))
        den = float(np.sqrt((c["norm_base"] ** 2).sum()))
        numel = int(c["numel"].sum())
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        row.update(
            depth=int(g["depth"].min()),
            tensors=len(g),
            numel=int(g["numel"].sum()),
            replaced=0,
            frobenius=num,
            relative=num / den if den > 0 else math.nan,
            mean_relative=float(c["relative"].mean()) if len(c) else math.nan,
            min_cosine=float(c["cosine"].min()) if len(c) else math.nan,
            identical=int(g["identical"].astype(bool).sum()),
            changed_share=float((c["changed_share"] * c["numel"]).sum()) / numel if numel else math.nan,
            mean_stable_rank=float(w["stable_rank"].mean()) if len(w) else math.nan,
            mean_effective_rank=float(w["effective_rank"].mean()) if len(w) else math.nan,
            intruders=int(pd.to_numeric(g["intruders"], errors="coerce").fillna(0).sum()),
            intruder_k=int(pd.to_numeric(g["intruder_k"], errors="coerce").fillna(0).sum()),
        )
        out.append(row)
    res = pd.DataFrame(out)
    return res.sort_values("depth", kind="stable").reset_index(drop=True) if len(res) else res


def submodule_table(df: pd.DataFrame) -> pd.DataFrame:
    """Relative change per model, stage and module kind (the report's heat map): columns ``model``, ``stage``,
    ``depth``, ``submodule``, ``numel``, ``relative``."""
    d = df[df["status"] == "compared"].copy()
    d["num2"], d["den2"] = d["frobenius"] ** 2, d["norm_base"] ** 2
    g = d.groupby(["model", "stage", "depth", "module_kind"], sort=False)[["num2", "den2", "numel"]].sum()
    g = g.reset_index().rename(columns={"module_kind": "submodule"})
    g["relative"] = np.sqrt(g["num2"]) / np.sqrt(g["den2"]).where(g["den2"] > 0)
    return g.drop(columns=["num2", "den2"]).sort_values(["model", "depth"], kind="stable").reset_index(drop=True)


def pairing_table(pairing: Pairing) -> pd.DataFrame:
    """The names that did not pair as they are: ``renamed`` (paired across a prefix), ``missing`` (only in the
    base) and ``extra`` (only in the tuned checkpoint). Columns ``status``, ``base``, ``tuned``."""
    rows = [{"status": "renamed", "base": a, "tuned": b} for a, b in pairing.renamed]
    rows += [{"status": "missing", "base": a, "tuned": ""} for a in pairing.missing]
    rows += [{"status": "extra", "base": "", "tuned": b} for b in pairing.extra]
    return pd.DataFrame(rows, columns=["status", "base", "tuned"])


def audit_findings(df: pd.DataFrame, kinds: pd.DataFrame, pairs: pd.DataFrame, model: str) -> list[Finding]:
    """What the audit shows first: which module kind moved most, identical tensors, intruder dimensions, and
    names that did not pair."""
    out: list[Finding] = []
    exact = "exact (computed on the weights, no sampling)"
    c = df[df["status"] == "compared"]
    k = kinds.dropna(subset=["relative"])
    if len(k) and float(k["relative"].max()) > 0:
        top, low = k.loc[k["relative"].idxmax()], k.loc[k["relative"].idxmin()]
        out.append(
            Finding(
                f"audit_kinds_{model}",
                f"{model}: {top['module_kind']} weights moved most ({pct(top['relative'], 3)} relative change, pooled "
                f"over {top['tensors']} tensors); {low['module_kind']} least ({pct(low['relative'], 3)}).",
                "weight_kinds",
                score=6,
                uncertainty=exact,
            )
        )
    same = int(c["identical"].astype(bool).sum())
    if same:
        names = ", ".join(c[c["identical"].astype(bool)]["name"].head(3))
        out.append(
            Finding(
                f"audit_identical_{model}",
                f"{model}: {same} of {len(c)} tensors are bit-identical to the base ({names}"
                + (" ...)" if same > 3 else ")")
                + ": fine-tuning did not touch them (frozen, or outside the adapter).",
                "weight_deltas",
                score=4,
                uncertainty=exact,
            )
        )
    intr = pd.to_numeric(c["intruders"], errors="coerce").fillna(0)
    if intr.sum() > 0:
        hit = c[intr > 0]
        approx = bool((hit["intruder_method"].astype(str).str.startswith("top-")).any())
        out.append(
            Finding(
                f"audit_intruders_{model}",
                f"{model}: {int(intr.sum())} intruder dimensions in {len(hit)} weight matrices (top singular "
                "directions of the tuned matrix close to no direction of the base's, Shuttleworth et al. 2024); most "
                f"in {hit.loc[intr[intr > 0].idxmax(), 'name']}.",
                "weight_deltas",
                score=5,
                uncertainty="upper bound for large matrices (compared with the base's top directions only)"
                if approx
                else exact,
            )
        )
    if len(pairs):
        counts = pairs["status"].value_counts()
        text = ", ".join(f"{int(n)} {s}" for s, n in counts.items())
        out.append(
            Finding(
                f"audit_pairing_{model}",
                f"Tensor names did not all pair as they are ({text}): renamed ones were paired across a wrapper "
                "prefix; missing and extra ones were not compared.",
                "weight_pairing",
                score=3,
                kind="caveat",
            )
        )
    return out
