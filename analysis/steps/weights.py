"""Weight deltas of every tuned model against the base: per tensor, per stage, and the first-layer filters."""

from __future__ import annotations

import pandas as pd

from tunelens.analysis import findings as F
from tunelens.analysis.engine.budget import PassCosts, measure_linalg_rates, weights_cost
from tunelens.analysis.engine.registry import Analysis, Context, Output, register
from tunelens.analysis.findings import Finding, pct
from tunelens.analysis.measures.weights import (
    EXACT_MAX_NUMEL,
    RANK_K,
    aggregate_deltas,
    as_state_dict,
    first_conv_filters,
    weight_deltas,
)
from tunelens.core.results import Results
from tunelens.core.text import is_text_model, submodule_kind

WEIGHT_DELTAS = "weight_deltas"
WEIGHT_STAGES = "weight_stages"
WEIGHT_SUBMODULES = "weight_submodules"  # transformers: per layer and kind of sub-module (query, key, ...)
FIRST_CONV = "first_conv"  # array: base, tuned and delta kernels of the first convolution


def submodule_deltas(deltas: pd.DataFrame) -> pd.DataFrame:
    """Relative change ``||W_t - W_b||_F / ||W_b||_F`` per model, stage and kind of transformer sub-module
    (embeddings; attention query, key, value, output; feed-forward in/out; LayerNorm), weights and biases
    of a kind pooled (:func:`tunelens.core.text.submodule_kind`)."""
    d = deltas[deltas["status"] == "compared"].copy()
    d["submodule"] = d["name"].map(submodule_kind)
    d["num2"], d["den2"] = d["frobenius"] ** 2, d["norm_base"] ** 2
    g = d.groupby(["model", "stage", "depth", "submodule"], sort=False)[["num2", "den2", "numel"]].sum().reset_index()
    g["relative"] = (g["num2"] ** 0.5) / (g["den2"] ** 0.5)
    return g.drop(columns=["num2", "den2"]).sort_values(["model", "depth"], kind="stable").reset_index(drop=True)


def cost(ctx: Context, costs: PassCosts) -> float:
    """Predicted seconds from the shapes of the tensors each tuned model shares with the base
    (:func:`~tunelens.analysis.engine.budget.weights_cost`)."""
    rates = costs.linalg or measure_linalg_rates()
    a = as_state_dict(ctx.base)
    total = 0.0
    for name in ctx.tuned:
        b = as_state_dict(ctx.models[name])
        shapes = [tuple(t.shape) for k, t in a.items() if k in b and b[k].shape == t.shape and t.is_floating_point()]
        total += weights_cost(shapes, 1, rates, EXACT_MAX_NUMEL, RANK_K)
    return total


def run(ctx: Context) -> Output:
    deltas, stages = [], []
    for name in ctx.tuned:
        d = weight_deltas(ctx.base, ctx.models[name], stage_map=ctx.stage_map)
        d.insert(0, "model", name)
        deltas.append(d)
        s = aggregate_deltas(d)
        s.insert(0, "model", name)
        stages.append(s)
    arrays, summary = {}, {}
    tables = {WEIGHT_DELTAS: pd.concat(deltas, ignore_index=True), WEIGHT_STAGES: pd.concat(stages, ignore_index=True)}
    if is_text_model(ctx.base):
        tables[WEIGHT_SUBMODULES] = submodule_deltas(tables[WEIGHT_DELTAS])
    filt = first_conv_filters(ctx.base, ctx.models[ctx.primary])
    if filt is not None:
        arrays[FIRST_CONV] = {k: v for k, v in filt.items() if k != "name"}
        summary["first_conv_name"] = filt["name"]
    return Output(
        tables=tables,
        arrays=arrays,
        summary=summary,
    )


def findings(res: Results) -> list[F.Finding]:
    st = res.table(WEIGHT_STAGES)
    if st is None or st.empty:
        return []
    return weight_findings(st, primary=res.summary.get("primary", "full"))


ANALYSIS = register(
    Analysis(
        name="weights",
        title="Weight deltas",
        order=10,
        tables=(WEIGHT_DELTAS, WEIGHT_STAGES, WEIGHT_SUBMODULES),
        run=run,
        findings=findings,
        optional=False,
        cost=cost,
    )
)


# ---- findings: this analysis's sentences, formatted from its tables


def weight_findings(stages: pd.DataFrame, primary: str = "full") -> list[Finding]:
    """Which stage moved most under each strategy, relative to the stem; frozen stages that stayed put."""
    out = []
    for model, g in stages.groupby("model", sort=False):
        g = g[g["stage"] != "head"].dropna(subset=["relative"])
        if g.empty:
            continue
        top = g.loc[g["relative"].idxmax()]
        if top["relative"] == 0:
            head = stages[(stages["model"] == model) & (stages["stage"] == "head")]
            replaced = bool(len(head)) and int(head["replaced"].sum()) > 0
            moved = bool(len(head)) and float(head["relative"].fillna(0).max()) > 0
            tail = (
                "only the head was replaced and trained."
                if replaced
                else ("only the head was trained." if moved else "nothing changed: the head is identical too.")
            )
            out.append(
                Finding(
                    f"weights_frozen_{model}",
                    f"{model}: the backbone did not move at all (every shared weight is bit-identical to the "
                    f"pretrained one); {tail}",
                    "weight_stages",
                    score=3 if replaced or moved else 9,
                    uncertainty="exact (computed on the weights, no sampling)",
                )
            )
            continue
        low = g.loc[g["relative"].idxmin()]
        first = g.sort_values("depth").iloc[0]  # the stem for ResNets
        parts = []
        if first["stage"] != top["stage"]:
            parts.append(
                f"{top['relative'] / first['relative']:.1f}x the {first['stage']}'s {pct(first['relative'], 2)}"
                if first["relative"] > 0
                else f"while the {first['stage']} did not move"
            )
        if low["stage"] not in (top["stage"], first["stage"]):
            parts.append(f"{low['stage']} moved least ({pct(low['relative'], 2)})")
        out.append(
            Finding(
                f"weights_{model}",
                f"{model}: {top['stage']} moved most, its weights changed by "
                f"{pct(top['relative'], 2)} of their norm (relative Frobenius)"
                + (", " + "; ".join(parts) if parts else "")
                + ".",
                "weight_stages",
                score=(8 if model == primary else 4),
                uncertainty="exact (computed on the weights, no sampling)",
            )
        )
    return out
