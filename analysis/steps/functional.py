"""Which changes matter: rewind each stage to its pretrained weights, interpolate from the pretrained to the
tuned weights, and fit linear probes per layer on both models (and the scratch control)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Subset

from tunelens.analysis import findings as F
from tunelens.analysis.engine.budget import PassCosts, functional_cost
from tunelens.analysis.engine.budget_plan import functional_shape
from tunelens.analysis.engine.registry import Analysis, Context, Output, register
from tunelens.analysis.engine.sharding import per_sample_batch_size, shard_loader
from tunelens.analysis.findings import Finding, modality, pct, units
from tunelens.analysis.findings.literature import NOT_AS_EXPECTED, literature_checks, merchant_checks
from tunelens.analysis.measures.interpolation import interpolate
from tunelens.analysis.measures.interventions import rewind
from tunelens.analysis.measures.probes import probe_gain, probe_layers
from tunelens.analysis.steps.similarity import CKA_CHANCE
from tunelens.analysis.steps.weights import WEIGHT_STAGES
from tunelens.core.results import Results

REWIND = "rewind"
INTERPOLATION = "interpolation"
PROBES = "probes"
PROBE_GAIN = "probe_gain"
_ENDS = {"base": "all_but_head", "tuned": "none"}  # interpolation endpoints = these rewind rows


def balanced_subset(test: Any, n: int | None, seed: int) -> Any:
    """``n`` items of ``test`` spread over its classes (one of each class in turn, each class in a seeded
    order), in dataset order; None or ``n >= len(test)``: ``test`` itself."""
    if n is None or n >= len(test):
        return test
    labels = np.array([int(test[i][1]) for i in range(len(test))])
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(int(q.pop(0)))
    sub = Subset(test, sorted(picked))
    sub.classes = getattr(test, "classes", None)  # type: ignore[attr-defined]
    return sub


def run(ctx: Context) -> Output:
    data = dict(ctx.data)
    data["test"] = balanced_subset(data["test"], ctx.settings.get("functional_images"), ctx.seed)  # the budget's
    # positions of the subset in the test split (None: all of it), to read the shared test pass
    subset = [int(i) for i in data["test"].indices] if data["test"] is not ctx.data["test"] else None
    # each rank its block of the batches (smaller batches when there are fewer than ranks: per-sample results)
    test_loader = shard_loader(data["test"], per_sample_batch_size(len(data["test"]), 256), device=ctx.device)
    train_loader = shard_loader(data["train"], per_sample_batch_size(len(data["train"]), 64), device=ctx.device)
    # BatchNorm re-estimation along the interpolation: every rank the same first batches, as one process
    bn_loader = DataLoader(data["train"], batch_size=64, shuffle=False)
    # the unchanged models' accuracy and the probes' test features come from the shared test pass
    rws = []
    for name in ctx.tuned:
        ref = ctx.passes.get(ctx.models[name]).metrics(subset)
        r = rewind(ctx.base, ctx.models[name], test_loader, device=ctx.device, stage_map=ctx.stage_map, reference=ref)
        r.table.insert(0, "model", name)
        rws.append(r.table)
    rw = rws[ctx.tuned.index(ctx.primary)].set_index("group")
    it = interpolate(
        ctx.base,
        ctx.models[ctx.primary],
        test_loader,
        steps=int(ctx.settings["interpolation_steps"]),
        train_loader=bn_loader,
        device=ctx.device,
        stage_map=ctx.stage_map,
        endpoints={g: {k: float(rw.loc[key, k]) for k in ("acc", "loss")} for g, key in _ENDS.items()},
    )
    table = it.table.copy()
    table.insert(0, "model", ctx.primary)
    names = ["base", ctx.primary] + (["scratch"] if "scratch" in ctx.models else [])
    layers = ctx.stage_map.cka_layers()
    probes = []
    for n in names:
        p = ctx.passes.get(ctx.models[n])
        feats, labels = p.features(layers), p.targets()
        if subset is not None:
            feats, labels = {k: v[subset] for k, v in feats.items()}, labels[subset]
        probes.append(
            probe_layers(
                ctx.models[n], train_loader, None, layers, name=n, device=ctx.device, test_features=(feats, labels)
            )
        )
    gains = probe_gain(probes[0], probes[1])
    gains["stage"] = [ctx.stage_map.layer_stage(str(n)) for n in gains["layer"]]
    return Output(
        tables={
            REWIND: pd.concat(rws, ignore_index=True),
            INTERPOLATION: table,
            PROBES: pd.concat(probes, ignore_index=True),
            PROBE_GAIN: gains,
        },
        summary={"interpolation": it.summary()},
    )


def findings(res: Results) -> list[F.Finding]:
    it = res.table(INTERPOLATION)
    barrier = res.summary.get("interpolation", {}).get("barrier")
    return functional_findings(
        res.table(REWIND),
        it,
        barrier,
        res.table(PROBE_GAIN),
        res.table(WEIGHT_STAGES),
        res.summary.get("primary", "full"),
        exclude=[k for k, v in res.summary.get("stages", {}).get("layers", {}).items() if v == "logits"] or ["fc"],
        n_test=res.summary.get("n_test"),
        cka=res.table(CKA_CHANCE),
        layer_stages=res.summary.get("stages", {}).get("layers", {}),
    )


def cost(ctx: Context, costs: PassCosts) -> float:
    """Predicted seconds of rewind, interpolation and probes (:func:`~tunelens.analysis.engine.budget.functional_cost`)."""
    return functional_cost(costs=costs, **functional_shape(ctx))


ANALYSIS = register(
    Analysis(
        name="functional",
        title="Which changes matter",
        order=40,
        tables=(REWIND, INTERPOLATION, PROBES, PROBE_GAIN),
        run=run,
        findings=findings,
        defaults={"interpolation_steps": 11},
        rules={"interpolation_steps": {"min": 2}},
        cost=cost,
        relative_cost=2.0,
    )
)


# ---- findings: this analysis's sentences, formatted from its tables


def _noise_pts(p: float, n: int) -> float:
    """Two standard errors of an accuracy difference between two evaluations on the same n images (points)."""
    return 100 * 2 * float(np.sqrt(2 * max(p * (1 - p), 1e-12) / max(n, 1)))


def functional_findings(
    rewind: pd.DataFrame | None,
    interp: pd.DataFrame | None,
    barrier: float | None,
    gains: pd.DataFrame | None,
    stages: pd.DataFrame | None,
    primary: str,
    exclude: Sequence[str] = ("fc",),
    n_test: int | None = None,
    cka: pd.DataFrame | None = None,
    layer_stages: dict[str, str] | None = None,
) -> list[Finding]:
    """Rewind criticality, the loss barrier, probe gains (``exclude``: layers left out, the logits), and the
    literature's three expectations. A change within its sampling noise is never called the largest."""
    out: list[Finding] = []
    if rewind is not None and len(rewind):
        r = rewind[rewind["model"] == primary]
        grp = r[~r["group"].isin(["none", "all_but_head"])]
        if len(grp):
            top = grp.loc[grp["acc_drop"].idxmax()]
            low = grp.loc[grp["acc_drop"].idxmin()]
            ref = r[r["group"] == "none"].iloc[0]
            n_ref = max(int(ref["n"]), 1)  # an accuracy of 0 or 1 has no binomial spread: read it as 1/(n+1) from it
            noise = _noise_pts(float(np.clip(ref["acc"], 1 / (n_ref + 1), n_ref / (n_ref + 1))), n_ref)
            if 100 * top["acc_drop"] > noise:
                text = (
                    f"Rewinding {top['group']} of the {primary} model to its pretrained weights costs "
                    f"{100 * top['acc_drop']:.1f} points of target accuracy, rewinding {low['group']} costs "
                    f"{100 * low['acc_drop']:.1f}: the new task lives most in {top['group']}."
                )
            elif top["acc_drop"] <= 0:
                text = (
                    f"No single stage of the {primary} model is critical: rewinding any one stage to its "
                    "pretrained weights costs no accuracy."
                )
            else:
                text = (
                    f"No single stage of the {primary} model is critical: rewinding any one stage to its "
                    f"pretrained weights costs at most {100 * top['acc_drop']:.1f} points ({top['group']}), "
                    "within sampling noise."
                )
            abh = r[r["group"] == "all_but_head"]
            if len(abh):
                text += f" Rewinding the whole backbone costs {100 * abh['acc_drop'].iloc[0]:.1f} points."
            out.append(
                Finding(
                    "rewind",
                    text,
                    "rewind",
                    score=9,
                    uncertainty=f"{int(ref['n'])} test {units()}; differences under about {noise:.1f} "
                    "points are within sampling noise (2 s.e.)",
                )
            )
    if interp is not None and len(interp) and barrier is not None:
        verdict = "No loss barrier" if barrier < 0.05 else "A loss barrier"
        a = interp.loc[interp["excess_loss"].idxmax(), "alpha"]
        out.append(
            Finding(
                "barrier",
                f"{verdict} between the pretrained and the fine-tuned weights ({primary}): the largest excess "
                f"loss over the straight line is {barrier:.3f} (at alpha = {a:.2f}); the two solutions "
                f"{'lie in one basin' if barrier < 0.05 else 'are separated by a ridge'}.",
                "interpolation",
                score=6,
                uncertainty=f"{int(interp['n'].iloc[0])} test {units()}, {len(interp)} points along the path"
                + (f"; BatchNorm statistics: {interp['bn'].iloc[0]}" if interp["bn"].iloc[0] != "none" else ""),
            )
        )
    if gains is not None and len(gains):
        g = gains[~gains["layer"].isin(list(exclude))].dropna(subset=["gain"])
        if len(g):
            top = g.loc[g["gain"].abs().idxmax()]
            n = int(n_test) if n_test else 100
            p_ = float(np.clip((top["tuned_test_acc"] + top["base_test_acc"]) / 2, 1 / (n + 1), n / (n + 1)))
            noise = _noise_pts(p_, n)
            if abs(top["gain"]) > noise:
                verb = "rises" if top["gain"] > 0 else "falls"
                text = (
                    f"Linear-probe accuracy on the target task {verb} most at {top['layer']} after fine-tuning "
                    f"({top['gain']:+.1f} points: {pct(top['base_test_acc'])} -> {pct(top['tuned_test_acc'])})."
                )
            else:
                text = (
                    "Linear-probe accuracy on the target task changes at no layer beyond sampling noise after "
                    f"fine-tuning (largest change {top['gain']:+.1f} points, at {top['layer']}; noise about "
                    f"{noise:.0f} points)"
                    + (
                        ", and the probes are at ceiling (100%) in both models."
                        if (g["base_test_acc"] >= 1).all() and (g["tuned_test_acc"] >= 1).all()
                        else "."
                    )
                )
            out.append(
                Finding(
                    "probe_gain",
                    text,
                    "probes",
                    score=7 if abs(top["gain"]) > noise else 3,
                    uncertainty=f"one probe per layer on {n} target test {units()}; changes under about "
                    f"{noise:.0f} points are within sampling noise (2 s.e.)",
                )
            )
    # the three expectations on the first and the last stage of any network, and for transformer encoders
    # Merchant et al.'s depth profile (analysis/literature.py)
    checks = literature_checks(rewind, gains, stages, primary)
    if modality() == "text":
        checks += merchant_checks(stages, cka, layer_stages or {}, primary)
    if checks:
        held = sum(NOT_AS_EXPECTED not in c and "[cannot tell]" not in c for c in checks)
        out.append(
            Finding(
                "literature",
                f"Transfer-learning expectations ({held} of {len(checks)} hold for "
                f"{primary}): " + "; ".join(checks) + ".",
                "rewind",
                score=5,
                kind="result" if held == len(checks) else "caveat",
            )
        )
    return out
