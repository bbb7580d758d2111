"""The strategies side by side: accuracy, how far each stage moved, CKA per stage, training time."""

from __future__ import annotations

import pandas as pd

from tunelens.analysis import findings as F
from tunelens.analysis.engine.registry import Analysis, Context, Output, no_pass, register
from tunelens.analysis.steps.evaluation import ACCURACY
from tunelens.analysis.steps.forgetting import FORGETTING
from tunelens.analysis.steps.similarity import CKA_DIAGONAL
from tunelens.analysis.steps.weights import WEIGHT_STAGES
from tunelens.core.results import Results

STRATEGIES = "strategies"


def strategies_table(res: Results) -> pd.DataFrame:
    """One row per fine-tuned model (and the scratch control): accuracy, trainable parameters, time, how far each
    stage moved, CKA to the base per stage and, when measured, the source accuracy each forgot."""
    acc = res.tables[ACCURACY].set_index("model")
    rows = []
    st = res.table(WEIGHT_STAGES)
    cka = res.table(CKA_DIAGONAL)
    fg = res.table(FORGETTING)
    for name in acc.index:
        row = {
            "model": name,
            "strategy": acc.loc[name, "strategy"],
            "test_acc": acc.loc[name, "acc"],
            "trainable_params": acc.loc[name, "trainable_params"] if "trainable_params" in acc else None,
            "train_seconds": acc.loc[name, "train_seconds"],
        }
        if fg is not None and name in set(fg["model"]):
            f = fg[fg["model"] == name].iloc[0]
            row["source_drop_head"] = f["head_drop"]  # source accuracy lost under the base head (fraction)
            row["source_drop_probe"] = f["probe_drop"]
        if st is not None:
            for _, r in st[st["model"] == name].iterrows():
                if r["stage"] != "head":
                    row[f"rel_change_{r['stage']}"] = r["relative"]
        if cka is not None and "model" in cka:
            for _, r in cka[cka["model"] == name].iterrows():
                row[f"cka_{r['layer']}"] = r["cka"]
        rows.append(row)
    return pd.DataFrame(rows)


def run(ctx: Context) -> Output:
    if ctx.results.table(ACCURACY) is None:
        return Output()
    return Output(tables={STRATEGIES: strategies_table(ctx.results)})


def findings(res: Results) -> list[F.Finding]:
    return []


ANALYSIS = register(
    Analysis(
        name="strategies",
        title="Strategies side by side",
        order=90,
        tables=(STRATEGIES,),
        run=run,
        findings=findings,
        optional=False,
        compares_models=False,
        cost=no_pass,
    )
)
