"""Which changes matter: rewind each stage to its pretrained weights, interpolate from the pretrained to the
tuned weights, and fit linear probes per layer on both models (and the scratch control)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Subset

from tunelens.analysis import findings as F
from tunelens.analysis.engine.registry import Analysis, Context, Output, register
from tunelens.analysis.engine.sharding import per_sample_batch_size, shard_loader
from tunelens.analysis.measures.interventions import interpolate, rewind
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
    return F.functional_findings(
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


ANALYSIS = register(
    Analysis(
        name="functional",
        title="Which changes matter",
        order=40,
        tables=(REWIND, INTERPOLATION, PROBES, PROBE_GAIN),
        run=run,
        findings=findings,
        defaults={"interpolation_steps": 11},
    )
)
