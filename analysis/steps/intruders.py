"""Intruder dimensions of every tuned model (Shuttleworth et al. 2024), read against a random-perturbation control.

Per weight matrix (conv kernels as ``out x in*k*k``) the top-``k`` left singular vectors of the tuned weight
whose largest |cosine| with any singular vector of the base weight is below ``threshold`` (definition in
:mod:`tunelens.analysis.measures.intruders`). The control puts the base against ``base + E`` with ``E`` Gaussian,
``||E||_F`` equal to the tuned model's ``||W1 - W0||_F`` per matrix: how many intruders an unstructured change of
the same size makes. The control runs for the primary model and for every LoRA model.
"""

from __future__ import annotations

import pandas as pd

from tunelens.analysis import findings as F
from tunelens.analysis.engine.budget import PassCosts, intruders_cost, measure_linalg_rates
from tunelens.analysis.engine.registry import Analysis, Context, Output, register
from tunelens.analysis.measures.intruders import (
    BASE_K,
    EXACT_MAX_NUMEL,
    aggregate_intruders,
    intruder_control,
    intruder_dimensions,
)
from tunelens.core.results import Results

INTRUDERS = "intruders"  # one row per model (or control) and weight matrix
INTRUDER_STAGES = "intruder_stages"  # summed per model (or control) and stage


def lora_models(ctx_or_manifests, tuned: list[str]) -> list[str]:
    """The tuned models that are LoRA fine-tunes (strategy ``lora``, or a PEFT adapter given to compare)."""
    mans = getattr(ctx_or_manifests, "manifests", ctx_or_manifests)
    return [n for n in tuned if mans[n].get("strategy") == "lora" or mans[n].get("adapter")]


def _shapes(ctx: Context, name: str) -> list[tuple[int, int]]:
    """The matrices (``rows x cols``) the intruders read for tuned model ``name`` (as
    :func:`~tunelens.analysis.measures.intruders.intruder_dimensions` pairs them)."""
    tuned = dict(ctx.models[name].named_parameters())
    out = []
    for n, t in ctx.base.named_parameters():
        if t.ndim >= 2 and n in tuned and tuned[n].shape == t.shape and t.shape[0] > 1 and t[0].numel() > 1:
            out.append((int(t.shape[0]), int(t[0].numel())))
    return out


def cost(ctx: Context, costs: PassCosts) -> float:
    """Predicted seconds from the matrix sizes (:func:`~tunelens.analysis.engine.budget.intruders_cost`): the
    base's vectors once (counted with the first model), each tuned model's and each control's."""
    rates = costs.linalg or measure_linalg_rates()
    k = int(ctx.settings["intruder_k"])
    controls = set([ctx.primary, *lora_models(ctx, ctx.tuned)])
    total = 0.0
    for i, name in enumerate(ctx.tuned):
        c = int(name in controls)
        one = intruders_cost(_shapes(ctx, name), 1, c, k, rates, EXACT_MAX_NUMEL, BASE_K)
        if i:  # the base's vectors come from the cache after the first model
            one -= intruders_cost(_shapes(ctx, name), 0, 0, k, rates, EXACT_MAX_NUMEL, BASE_K)
        total += one
    return total


def run(ctx: Context) -> Output:
    k = int(ctx.settings["intruder_k"])
    thr = float(ctx.settings["intruder_threshold"])
    rows, stages = [], []
    controls = list(dict.fromkeys([ctx.primary, *lora_models(ctx, ctx.tuned)]))
    cache: dict = {}  # the base's singular vectors, computed once for every model and control
    for i, name in enumerate(ctx.tuned):
        for kind, like in [("tuned", None)] + ([("control", name)] if name in controls else []):
            if kind == "tuned":
                d = intruder_dimensions(ctx.base, ctx.models[name], k=k, threshold=thr, cache=cache)
                label = name
            else:
                d = intruder_control(
                    ctx.base, like=ctx.models[name], k=k, threshold=thr, seed=ctx.seed + i, cache=cache
                )
                label = f"random like {name}"
            d.insert(0, "model", label)
            d.insert(1, "kind", kind)
            d.insert(2, "like", like or name)
            rows.append(d)
            s = aggregate_intruders(d)
            s.insert(0, "model", label)
            s.insert(1, "kind", kind)
            s.insert(2, "like", like or name)
            s.insert(len(s.columns), "threshold", thr)
            stages.append(s)
    return Output(
        tables={INTRUDERS: pd.concat(rows, ignore_index=True), INTRUDER_STAGES: pd.concat(stages, ignore_index=True)}
    )


def _how(res: Results) -> str:
    t = res.tables.get(INTRUDERS)
    methods = set(t["method"].dropna()) if t is not None and "method" in t.columns else {"exact"}
    if methods <= {"exact"}:
        return "exact (singular vectors of the weights, float64)"
    top = sorted(m for m in methods if m != "exact")
    return (
        f"exact for the smaller matrices, randomized {', '.join(top)} base directions for matrices over "
        f"{EXACT_MAX_NUMEL} entries (upper bounds there)"
    )


def _where(st: pd.DataFrame, model: str) -> str:
    g = st[(st["model"] == model) & (st["intruders"] > 0)].sort_values("intruders", ascending=False)
    return ", ".join(f"{r['stage']} {int(r['intruders'])}" for _, r in g.head(3).iterrows())


def findings(res: Results) -> list[F.Finding]:
    st = res.table(INTRUDER_STAGES)
    if st is None or st.empty:
        return []
    primary = res.summary.get("primary", "full")
    tuned = st[st["kind"] == "tuned"].groupby("model", sort=False)[["intruders", "k", "layers"]].sum()
    ctrl = st[st["kind"] == "control"].groupby("like", sort=False)["intruders"].sum()
    thr = float(st["threshold"].iloc[0])
    kmax = int(res.tables[INTRUDERS]["k"].max()) if INTRUDERS in res.tables else 0
    lora = [m for m in ctrl.index if m != primary and m in tuned.index]
    out = []
    for m in lora or ([primary] if primary in ctrl.index else []):
        t = tuned.loc[m]
        parts = [
            f"{m}: {int(t['intruders'])} intruder dimensions among the top {kmax} singular vectors of its "
            f"{int(t['layers'])} weight matrices"
        ]
        where = _where(st, m)
        if where:
            parts.append(f" (most in {where})")
        others = []
        if m != primary and primary in tuned.index:
            w = _where(st, primary)
            others.append(
                f"{int(tuned.loc[primary, 'intruders'])} for the {primary} fine-tune" + (f" ({w})" if w else "")
            )
        if m in ctrl.index:
            others.append(f"{int(ctrl[m])} for the base under a random change of the same norm per matrix")
        if others:
            parts.append(", against " + " and ".join(others))
        more = int(t["intruders"]) > int(ctrl.get(m, 0))
        parts.append(
            ": the update put new high-ranking directions into the weights"
            if more
            else ": no more new directions than an unstructured change of that size"
        )
        out.append(
            F.Finding(
                f"intruders_{m}",
                "".join(parts) + ".",
                INTRUDER_STAGES,
                score=7.5 if m != primary else 5,
                uncertainty=f"{_how(res)}; intruder = max |cos| with every base singular vector "
                f"< {thr}; the control is one random draw (Shuttleworth et al. 2024)",
            )
        )
    return out


ANALYSIS = register(
    Analysis(
        name="intruders",
        title="Intruder dimensions",
        order=15,
        tables=(INTRUDERS, INTRUDER_STAGES),
        run=run,
        findings=findings,
        defaults={"intruder_k": 10, "intruder_threshold": 0.5},
        rules={"intruder_k": {"min": 1}, "intruder_threshold": {"gt": 0, "max": 1}},
        cost=cost,
    )
)
