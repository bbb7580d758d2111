"""Attribution study: where each model finds its evidence (Captum methods on the same images), calibrated by
a ceiling (the base against itself under a one-pixel shift or new noise) and a floor (a randomized network)."""

from __future__ import annotations

import numpy as np

from tunelens.core.results import Results

from .. import findings as F
from ..attribution import DEFAULT_METHODS
from ..attribution_study import attribution_study
from ..registry import Analysis, Context, Output, register

SUMMARY = "attribution_summary"
COMPARISONS = "attribution_comparisons"
PER_CLASS = "attribution_per_class"
LOCALISATION = "attribution_localisation"
FAITHFULNESS = "attribution_faithfulness"
EXAMPLES_PREFIX = "attribution_examples_"  # arrays: one per method


def run(ctx: Context) -> Output:
    s = ctx.settings
    test = ctx.data["test"]
    classes = getattr(test, "classes", None)
    study = attribution_study(
        ctx.base,
        ctx.models[ctx.primary],
        test,
        methods=tuple(s.get("attribution_methods") or DEFAULT_METHODS),
        n_images=int(s["attribution_images"]),
        seed=ctx.seed,
        device=ctx.device,
        probe_data=ctx.data.get("train"),
        classes=list(classes) if classes is not None else None,
        progress=ctx.progress,
    )
    tables = {SUMMARY: study.summary, COMPARISONS: study.comparisons, PER_CLASS: study.per_class}
    skipped = {}
    if study.localisation is not None:
        tables[LOCALISATION] = study.localisation
    elif study.localisation_note:
        skipped["localisation"] = study.localisation_note
    if study.faithfulness is not None:
        tables[FAITHFULNESS] = study.faithfulness
    arrays = {}
    for method, ex in study.examples.items():
        arr = {
            "inputs": ex.inputs,
            "base": ex.base,
            "tuned": ex.tuned,
            "labels": ex.labels,
            "base_pred": ex.base_pred,
            "tuned_pred": ex.tuned_pred,
            "similarity": ex.similarity,
            "kinds": np.array(ex.kinds, dtype="U32"),
        }
        if ex.masks is not None:
            arr["masks"] = ex.masks
        arrays[f"{EXAMPLES_PREFIX}{method}"] = arr
    summary = {
        "attribution": {
            "settings": study.settings,
            "timings": study.timings,
            "notes": study.notes,
            "primary": ctx.primary,
            "classes": study.classes,
        }
    }
    return Output(tables=tables, arrays=arrays, summary=summary, notes=tuple(study.notes), skipped=skipped)


def findings(res: Results) -> list[F.Finding]:
    summ = res.table(SUMMARY)
    if summ is None or summ.empty:
        return []
    return F.attribution_findings(
        summ, res.table(LOCALISATION), res.table(PER_CLASS), res.summary.get("primary", "full")
    )


ANALYSIS = register(
    Analysis(
        name="attribution",
        title="Attributions",
        order=30,
        tables=(SUMMARY, COMPARISONS, PER_CLASS, LOCALISATION, FAITHFULNESS),
        run=run,
        findings=findings,
        # attribution_methods: None = every method of DEFAULT_METHODS, or a list of their names
        defaults={"attribution_images": 48, "attribution_methods": None},
    )
)
