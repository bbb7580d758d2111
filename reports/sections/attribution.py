"""Attributions: both models' maps on the same inputs, and how much they differ against a ceiling and a floor."""

from __future__ import annotations

import numpy as np

from tunelens.analysis.findings import units, word
from tunelens.core.results import Results

from .. import figures as fg
from ..model import Figure, Section, Table
from ..token_figures import token_grid

_SHOW = ("integrated_gradients", "grad_cam", "saliency", "occlusion")


def _grid(ex: dict, classes: list[str], method: str) -> str:
    def name(c) -> str:
        c = int(c)
        return classes[c] if 0 <= c < len(classes) else str(c)

    n = len(ex["kinds"])
    labels = [
        f"{ex['kinds'][i].replace('_', ' ')}\n"
        f"true: {name(ex['labels'][i])}\n"
        f"base: {name(ex['base_pred'][i])}\n"
        f"tuned: {name(ex['tuned_pred'][i])}\n"
        f"similarity {ex['similarity'][i]:.2f}"
        for i in range(n)
    ]
    masks = [ex["masks"][i] for i in range(n)] if "masks" in ex else None
    fig = fg.attribution_grid(
        [fg.to_display(ex["inputs"][i]) for i in range(n)],
        ex["base"],
        ex["tuned"],
        labels,
        title=method,
        masks=masks,
        overlay=True,
    )
    return fg.fig_to_uri(fig, "png")


ORDER = 30


def build(res: Results) -> Section | None:
    summ = res.table("attribution_summary")
    if summ is None or summ.empty:
        return None
    info = res.summary.get("attribution", {})
    st = info.get("settings", {})
    sec = Section(
        "attribution",
        "Attributions: where each model finds its evidence",
        "Captum attributions of the target-class logit for both models on the same test "
        f"{units()}, with "
        "the same targets, baselines and noise seeds. Each method's base-vs-tuned agreement is read "
        f"between a ceiling ({st.get('ceiling', 'the base model against itself under a tiny perturbation')}) "
        f"and a floor ({st.get('floor', 'a randomized copy')}; Adebayo et al. 2018): change index = "
        "(ceiling - AB) / (ceiling - floor). A method whose ceiling and floor are close cannot tell the "
        "models apart and is flagged.",
    )
    sec.notes.extend(info.get("notes", []))
    cols = [
        "method",
        "informative",
        "ab",
        "ceiling",
        "floor",
        "floor_top",
        "gap",
        "gap_top",
        "change_index",
        "change_index_lo",
        "change_index_hi",
        "ab_ssim",
        "ab_topk",
        "ab_spearman",
        "n",
        "seconds",
    ]
    sec.blocks.append(
        Table(
            "tbl-attr-summary",
            "Agreement per method, with ceiling, floor and change index",
            summ[[c for c in cols if c in summ]],
            csv="attribution_summary",
            collapsed=False,
            caption=f"ab/ceiling/floor: mean {summ['similarity'].iloc[0]} over {units()}; floor_top "
            "randomizes only the top stages.",
        )
    )
    classes = info.get("classes") or res.summary.get("data", {}).get("classes", [])
    informative = set(summ.loc[summ["informative"].astype(bool), "method"])
    for m in _SHOW:
        ex = res.arrays.get(f"attribution_examples_{m}")
        if ex is None or not len(ex.get("kinds", [])):
            continue
        tag = "" if m in informative else " (flagged uninformative)"
        sec.blocks.append(
            Figure(
                f"fig-attr-{m}",
                f"{m}{tag}: input, base map, tuned map, difference",
                _grid(ex, classes, m),
                "Rows: the image whose map changed most, least, one the fine-tuning fixed and one it "
                "broke (when present). Base and tuned maps share one colour scale, clipped at the "
                f"{fg.CLIP_PERCENTILE:g}th percentile of |attribution| over both (Captum's outlier_perc="
                f"{100 - fg.CLIP_PERCENTILE:g}): the strongest pixels saturate, so that a few outliers do not wash "
                "the rest out. The maps are drawn over the input in grey, more opaque where |attribution| is "
                "larger; the statistics above use the raw maps.",
            )
        )
    for m in ("integrated_gradients", "feature_ablation"):
        ex = res.arrays.get(f"attribution_tokens_{m}")
        if ex is None or not len(ex.get("labels", [])):
            continue
        sim = np.nan_to_num(ex["similarity"], nan=1.0)
        order = np.argsort(sim, kind="stable")
        rows = list(dict.fromkeys([int(i) for i in order[:3]] + [int(i) for i in order[::-1][:3]]))
        tag = "" if m in informative else " (flagged uninformative)"
        sec.blocks.append(
            Figure(
                f"fig-attr-tokens-{m}",
                f"{m}{tag}: the same sentences through the base and the tuned model",
                token_grid(ex, classes, m, rows),
                "The three sentences whose attributions changed most, then the three that changed least. Each "
                "word token is shaded by its relevance for the true class (red for, blue against) on one scale "
                "for both models; the decisive tokens (the last clause's adjective and its 'not') are underlined.",
                source="attribution_comparisons",
            )
        )
    loc = res.table("attribution_localisation")
    if loc is not None and len(loc):
        mass = loc[loc["metric"] == "mass"].copy()
        long = mass.melt(id_vars=["method"], value_vars=["base", "tuned"], var_name="model", value_name="mass")
        sec.blocks.append(
            Figure(
                "fig-attr-localisation",
                f"Share of positive attribution {word('region')}",
                fg.bar_chart(
                    long,
                    "method",
                    "mass",
                    hue="model",
                    ylabel="relevance mass on decisive tokens" if units() == "sentences" else "relevance mass in mask",
                ),
                "Relevance mass (Arras et al. 2022) before and after fine-tuning.",
                source="attribution_localisation",
            )
        )
        sec.blocks.append(
            Table(
                "tbl-attr-localisation",
                "Localisation before vs after (bootstrap 95% CIs)",
                loc,
                csv="attribution_localisation",
            )
        )
    pc = res.table("attribution_per_class")
    if pc is not None and len(pc):
        sec.blocks.append(
            Table("tbl-attr-class", "Per class (bootstrap 95% CIs)", pc, csv="attribution_per_class", collapsed=True)
        )
    fa = res.table("attribution_faithfulness")
    if fa is not None and len(fa):
        sec.blocks.append(
            Table(
                "tbl-attr-faith", "Faithfulness: deletion and insertion AUC (RISE)", fa, csv="attribution_faithfulness"
            )
        )
    return sec
