"""Attribution study: where each model finds its evidence (Captum methods on the same images), calibrated by
a ceiling (the base against itself under a one-pixel shift or new noise) and a floor (a randomized network)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tunelens.analysis import findings as F
from tunelens.analysis.engine.budget import PassCosts, attribution_cost
from tunelens.analysis.engine.budget_plan import attribution_inputs
from tunelens.analysis.engine.registry import Analysis, Context, Output, register
from tunelens.analysis.findings import Finding, pct, span, units, word
from tunelens.analysis.measures.attribution.methods import DISPLAY_NAMES, choose_methods, method_spec_problem
from tunelens.analysis.measures.attribution.methods import FAITHFUL as STUDY_FAITHFULNESS
from tunelens.analysis.measures.attribution.study import attribution_study
from tunelens.analysis.measures.attribution.text import text_attribution_study
from tunelens.core.results import Results
from tunelens.core.text import is_text_model

SUMMARY = "attribution_summary"
COMPARISONS = "attribution_comparisons"
PER_CLASS = "attribution_per_class"
LOCALISATION = "attribution_localisation"
FAITHFULNESS = "attribution_faithfulness"
EXAMPLES_PREFIX = "attribution_examples_"  # arrays: one per method


def methods(ctx: Context) -> tuple[list[str], dict[str, str]]:
    """The attribution methods to run (``analysis.attribution_methods``: ``default`` or comma-separated names)
    and those left out with the reason (Grad-CAM where the model has no spatial layer after its stem)."""
    return choose_methods(str(ctx.settings.get("attribution_methods", "default")), lambda: ctx.stage_map)


def cost(ctx: Context, costs: PassCosts) -> float:
    """Predicted seconds of the study at the configured settings (:func:`~tunelens.analysis.engine.budget.attribution_cost`)."""
    meths, n, opts, side = attribution_inputs(ctx)
    return attribution_cost(meths, n, opts, costs, side)


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
    return attribution_findings(summ, res.table(LOCALISATION), res.table(PER_CLASS), res.summary.get("primary", "full"))


ANALYSIS = register(
    Analysis(
        name="attribution",
        title="Attributions",
        order=30,
        tables=(SUMMARY, COMPARISONS, PER_CLASS, LOCALISATION, FAITHFULNESS),
        run=run,
        findings=findings,
        defaults={"attribution_images": 48, "attribution_methods": "default"},
        # attribution_ig_steps and attribution_ablation_batch: text-only settings (the text preset defines them)
        rules={
            "attribution_images": {"min": 1},
            "attribution_ig_steps": {"min": 2},
            "attribution_ablation_batch": {"min": 0},
            "attribution_methods": {"check": method_spec_problem},
        },
        cost=cost,
        relative_cost=4.0,
    )
)


# ---- findings: this analysis's sentences, formatted from its tables


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _index_note(ci: float) -> str:
    """Words for a change index outside [0, 1] (see the attribution study's calibration)."""
    if ci > 1:
        return " (above 1: beyond the randomized network)"
    if ci < 0:
        return " (below 0: closer than the base model to itself)"
    return ""


def attribution_findings(
    summary: pd.DataFrame, localisation: pd.DataFrame | None, per_class: pd.DataFrame, primary: str
) -> list[Finding]:
    """How much the maps changed (change index with CI), where the evidence moved (mass inside the object),
    which class changed most; uninformative methods are named, not used."""
    out: list[Finding] = []
    inf = summary[summary["informative"]]
    flagged = summary[~summary["informative"]]["method"].tolist()
    for _, r in inf.dropna(subset=["change_index"]).sort_values("change_index", ascending=False).head(2).iterrows():
        name = DISPLAY_NAMES.get(r["method"], r["method"])
        ci, lo, hi = r["change_index"], r["change_index_lo"], r["change_index_hi"]
        has_ci = bool(np.isfinite(lo) and np.isfinite(hi))
        if has_ci and lo <= 0 <= hi:
            how = "did not move clearly away from the base model's (the CI includes 0)"
        elif ci > 1:
            how = f"moved farther from the base model's than a randomized network's {word('maps')} do"
        elif ci < 0:
            how = f"stayed closer to the base model's than the base model to itself {word('ceiling')}"
        else:
            how = f"moved {'far' if ci > 0.5 else 'part of the way'} from the base model's"
        note = _index_note(ci)
        out.append(
            Finding(
                f"attr_change_{r['method']}",
                f"{_cap(name)} {word('maps')} of the {primary} model {how}: change index "
                f"{ci:.2f}{note} on a scale where 0 is as close as the base model to itself {word('ceiling')} "
                f"({r['ceiling']:.2f}) and 1 is as far as a randomized network ({r['floor']:.2f}).",
                "attribution_summary",
                score=7.5 if has_ci and not lo <= 0 <= hi else 4,
                uncertainty=(
                    f"95% CI {span(lo, hi)} (bootstrap over {int(r['n'])} {units()}; similarity: {r['similarity']})"
                    if has_ci
                    else f"no CI: {int(r['n'])} {word('unit')}(s), too few to bootstrap"
                ),
            )
        )
    if localisation is not None and len(inf):
        loc = localisation[(localisation["metric"] == "mass") & localisation["method"].isin(inf["method"])]
        if len(loc):
            r = loc.loc[loc["delta"].abs().idxmax()]
            name = DISPLAY_NAMES.get(r["method"], r["method"])
            rose = "rose" if r["delta"] > 0 else "fell"
            sig = r["delta_lo"] > 0 or r["delta_hi"] < 0
            out.append(
                Finding(
                    "attr_localisation",
                    f"After fine-tuning, the share of positive {name} attribution {word('region')} "
                    f"{rose} from {pct(r['base'])} to {pct(r['tuned'])}"
                    + ("" if sig else " (not distinguishable from no change)")
                    + ".",
                    "attribution_localisation",
                    score=8 if sig else 4,
                    uncertainty=f"95% CI of the change {span(r['delta_lo'], r['delta_hi'], '+.1f', 100)} points "
                    f"(paired bootstrap over {int(r['n'])} {units()})",
                )
            )
    if len(inf) and per_class is not None and len(per_class):
        m = inf.sort_values("change_index", ascending=False)["method"].iloc[0]
        pc = per_class[per_class["method"] == m].dropna(subset=["change_index"])
        if len(pc) > 1:
            r = pc.loc[pc["change_index"].idxmax()]
            rest = pc.drop(index=r.name)
            has_ci = bool(np.isfinite(pc["ab_lo"]).all() and np.isfinite(pc["ab_hi"]).all())
            if has_ci and bool((r["ab_hi"] < rest["ab_lo"]).all()):
                out.append(
                    Finding(
                        "attr_class",
                        f"{_cap(DISPLAY_NAMES.get(m, m))} {word('maps')} changed most for class {r['class']} "
                        f"(change index {r['change_index']:.2f}{_index_note(r['change_index'])}; base-vs-tuned "
                        f"similarity {r['ab']:.2f}).",
                        "attribution_per_class",
                        score=4,
                        uncertainty=f"similarity 95% CI {span(r['ab_lo'], r['ab_hi'])} over {int(r['n'])} {units()}",
                    )
                )
    if flagged:
        out.append(
            Finding(
                "attr_flagged",
                "Uninformative for comparing these two models, so left out of the findings: "
                + ", ".join(DISPLAY_NAMES.get(f, f) for f in flagged)
                + f" (their {word('maps')} barely change even when the "
                "network's top layers are randomized, or their ceiling and floor are too close).",
                "attribution_summary",
                score=2,
                kind="caveat",
            )
        )
    return out
