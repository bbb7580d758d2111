"""Attribution study: where each model finds its evidence (Captum methods on the same images), calibrated by
a ceiling (the base against itself under a one-pixel shift or new noise) and a floor (a randomized network)."""

from __future__ import annotations

import numpy as np

from tunelens.core.results import Results
from tunelens.core.text import is_text_model

from .. import findings as F
from ..attribution import DEFAULT_METHODS, METHODS
from ..attribution_study import attribution_study
from ..budget import FAITHFUL as STUDY_FAITHFULNESS  # the study's default: integrated gradients and Grad-CAM
from ..registry import Analysis, Context, Output, register
from ..text_attribution import text_attribution_study

SUMMARY = "attribution_summary"
COMPARISONS = "attribution_comparisons"
PER_CLASS = "attribution_per_class"
LOCALISATION = "attribution_localisation"
FAITHFULNESS = "attribution_faithfulness"
EXAMPLES_PREFIX = "attribution_examples_"  # arrays: one per method


def methods(ctx: Context) -> tuple[list[str], dict[str, str]]:
    """The attribution methods to run (``analysis.attribution_methods``: ``default`` or comma-separated names)
    and those left out with the reason (Grad-CAM where the model has no spatial layer after its stem)."""
    spec = str(ctx.settings.get("attribution_methods", "default"))
    chosen = list(DEFAULT_METHODS) if spec == "default" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    skipped = {}
    if "grad_cam" in chosen and ctx.stage_map.gradcam_layer is None:
        chosen.remove("grad_cam")
        skipped["grad_cam"] = f"Grad-CAM {ctx.stage_map.gradcam_reason}"
    return chosen, skipped


TOKENS_PREFIX = "attribution_tokens_"  # arrays: one per method, sentences with token relevance (text)


def run_text(ctx: Context) -> Output:
    """The text form: token attributions (LayerIntegratedGradients, feature ablation) with the same tables."""
    test = ctx.data["test"]
    study = text_attribution_study(
        ctx.base,
        ctx.models[ctx.primary],
        test,
        n_sentences=int(ctx.settings["attribution_images"]),
        seed=ctx.seed,
        probe_data=ctx.data.get("train"),
        classes=list(getattr(test, "classes", []) or []),
        # text-only settings (the text preset defines them): integration steps and tokens ablated per pass
        n_steps=int(ctx.settings.get("attribution_ig_steps", 16)),
        ablation_batch=int(ctx.settings.get("attribution_ablation_batch", 4)),
    )
    summary = {
        "attribution": {
            "settings": dict(
                study.settings,
                ceiling="the base model against itself with every sentence shifted by one token (a neutral word "
                "after [CLS])",
                floor="the base model with every stage re-initialised",
            ),
            "timings": study.timings,
            "notes": study.notes,
            "primary": ctx.primary,
            "classes": list(getattr(test, "classes", []) or []),
            "modality": "text",
        }
    }
    tables = {SUMMARY: study.summary, COMPARISONS: study.comparisons, PER_CLASS: study.per_class}
    skipped = {}
    if study.localisation is not None:
        tables[LOCALISATION] = study.localisation
    else:
        skipped["localisation"] = (
            "the sentences carry no decisive tokens (real reviews such as the text preset's Rotten Tomatoes "
            "snippets come without them; for tunelens compare, a decisive column of character spans in the --data "
            "CSV), so attributions are not scored against them"
        )
    return Output(
        tables=tables,
        arrays={f"{TOKENS_PREFIX}{m}": ex for m, ex in study.examples.items()},
        summary=summary,
        notes=tuple(study.notes),
        skipped=skipped,
    )


def run(ctx: Context) -> Output:
    if is_text_model(ctx.base):
        return run_text(ctx)
    s = ctx.settings
    test = ctx.data["test"]
    classes = getattr(test, "classes", None)
    chosen, skipped = methods(ctx)
    if not chosen:
        raise ValueError("no attribution method applies to this model: " + "; ".join(skipped.values()))
    study = attribution_study(
        ctx.base,
        ctx.models[ctx.primary],
        test,
        chosen,
        n_images=int(s["attribution_images"]),
        seed=ctx.seed,
        device=ctx.device,
        probe_data=ctx.data.get("train"),
        classes=list(classes) if classes is not None else None,
        options=s.get("attribution_options") or None,  # set by the time budget (analysis/budget.py)
        faithfulness=STUDY_FAITHFULNESS if s.get("attribution_faithfulness", True) else False,
        progress=ctx.progress,
    )
    tables = {SUMMARY: study.summary, COMPARISONS: study.comparisons, PER_CLASS: study.per_class}
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
        defaults={"attribution_images": 48, "attribution_methods": "default"},
    )
)
