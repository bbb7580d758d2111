"""Weight deltas of every tuned model against the base: per tensor, per stage, and the first-layer filters."""

from __future__ import annotations

import pandas as pd

from tunelens.core.results import Results

from .. import findings as F
from ..registry import Analysis, Context, Output, register
from ..weights import aggregate_deltas, first_conv_filters, weight_deltas

WEIGHT_DELTAS = "weight_deltas"
WEIGHT_STAGES = "weight_stages"
FIRST_CONV = "first_conv"  # array: base, tuned and delta kernels of the first convolution


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
    filt = first_conv_filters(ctx.base, ctx.models[ctx.primary])
    if filt is not None:
        arrays[FIRST_CONV] = {k: v for k, v in filt.items() if k != "name"}
        summary["first_conv_name"] = filt["name"]
    return Output(
        tables={
            WEIGHT_DELTAS: pd.concat(deltas, ignore_index=True),
            WEIGHT_STAGES: pd.concat(stages, ignore_index=True),
        },
        arrays=arrays,
        summary=summary,
    )


def findings(res: Results) -> list[F.Finding]:
    st = res.table(WEIGHT_STAGES)
    if st is None or st.empty:
        return []
    return F.weight_findings(st, primary=res.summary.get("primary", "full"))


ANALYSIS = register(
    Analysis(
        name="weights",
        title="Weight deltas",
        order=10,
        tables=(WEIGHT_DELTAS, WEIGHT_STAGES),
        run=run,
        findings=findings,
        optional=False,
    )
)
