"""Representation similarity: CKA heatmaps, the per-layer diagonal against chance, activations."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from tunelens.analysis.findings import units
from tunelens.core.results import Results

from .. import figures as fg
from ..model import Figure, Section, Table


def _matrix(df):
    return df.set_index("layer").drop(columns=["estimator"], errors="ignore")


ORDER = 20


def build(res: Results) -> Section | None:
    ab = res.table("cka_base_tuned")
    if ab is None:
        return None
    info = res.summary.get("cka", {})
    est = info.get("estimator", "")
    primary = info.get("primary", "tuned")
    sec = Section(
        "similarity",
        "Representation similarity (CKA)",
        "Linear centred kernel alignment between the two models' activations on the same target test "
        f"{units()} (Kornblith et al. 2019), accumulated over minibatches with the unbiased HSIC estimator "
        "(Song et al. 2012; Nguyen, Raghu and Kornblith 2021). 1 = the same representation up to rotation "
        f"and scale. Estimator: {est}; {info.get('n_samples', '?')} {units()}.",
    )
    if info.get("skipped_samples"):
        sec.notes.append(
            f"{info['skipped_samples']} {units()} in batches smaller than 4 were skipped "
            "(the unbiased estimator needs n >= 4)."
        )
    sec.blocks.append(
        Figure(
            "fig-cka-ab",
            f"CKA between base (rows) and {primary} (columns) layers",
            fg.heatmap(_matrix(ab), vmin=0, vmax=1, xlabel=primary, ylabel="base"),
        )
    )
    for key, title in (("cka_base_base", "base x base"), ("cka_tuned_tuned", f"{primary} x {primary}")):
        m = res.table(key)
        if m is not None:
            sec.blocks.append(
                Figure(
                    f"fig-{key.replace('_', '-')}",
                    f"CKA within one model: {title}",
                    fg.heatmap(_matrix(m), vmin=0, vmax=1),
                )
            )
    ch = res.table("cka_chance")
    if ch is not None and len(ch):
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        x = np.arange(len(ch))
        ax.plot(x, ch["cka_base_tuned"], "o-", label=f"base vs {primary}")
        ax.fill_between(x, ch["ci_low"], ch["ci_high"], alpha=0.25, label="95% CI (bootstrap over batches)")
        ax.plot(x, ch["cka_base_random"], "s--", label="base vs random weights (chance)")
        if ch["cka_tuned_scratch"].notna().any():
            ax.plot(x, ch["cka_tuned_scratch"], "^:", label=f"{primary} vs scratch control")
        ax.set_xticks(x)
        ax.set_xticklabels(ch["layer"], rotation=30, ha="right")
        ax.set_ylabel("CKA")
        ax.set_ylim(min(-0.05, float(np.nanmin(ch[["cka_base_tuned", "cka_base_random"]].to_numpy())) - 0.05), 1.05)
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        sec.blocks.append(
            Figure(
                "fig-cka-diagonal",
                "Per-layer CKA(base, tuned) against chance",
                fg.fig_to_uri(fig),
                "CKA between untrained networks is already high at the stem and falls with depth, so "
                "the tuned model is read against the same architecture with random weights.",
                source="cka_chance",
            )
        )
        sec.blocks.append(Table("tbl-cka-chance", "Per-layer CKA with baselines", ch, csv="cka_chance"))
    dg = res.table("cka_diagonal")
    if dg is not None and dg["model"].nunique() > 1:
        sec.blocks.append(
            Figure(
                "fig-cka-strategies",
                "CKA to the base per layer, by strategy",
                fg.line_chart(
                    dg, "layer", "cka", hue="model", xorder=list(dict.fromkeys(dg["layer"])), ylabel="CKA(base, tuned)"
                ),
            )
        )
    act = res.table("activations")
    if act is not None and len(act):
        sec.blocks.append(
            Figure(
                "fig-activations",
                "Fraction of zero activations per layer",
                fg.line_chart(
                    act,
                    "layer",
                    "frac_zero",
                    hue="model",
                    xorder=list(dict.fromkeys(act["layer"])),
                    ylabel="fraction of zeros",
                ),
                "Share of exactly-zero values (after ReLU) in each captured output.",
            )
        )
        sec.blocks.append(Table("tbl-activations", "Activation statistics", act, csv="activations", collapsed=True))
    fm = res.arrays.get("feature_maps")
    if fm is not None and "images" in fm:
        for layer in [k[: -len("_base")] for k in fm if k.endswith("_base")]:
            a, b, chs = fm[f"{layer}_base"], fm[f"{layer}_tuned"], fm[f"{layer}_channels"]
            n, k = a.shape[0], a.shape[1]
            rows, labels = [], []
            for i in range(n):
                rows.append(
                    [fg.to_display(fm["images"][i])] + [a[i, j] for j in range(k)] + [b[i, j] for j in range(k)]
                )
                labels.append(f"image {i}")
            cols = ["input"] + [f"base c{c}" for c in chs[0]] + [f"tuned c{c}" for c in chs[0]]
            lim = float(max(np.abs(a).max(), np.abs(b).max())) or 1.0
            sec.blocks.append(
                Figure(
                    f"fig-maps-{layer}",
                    f"Strongest {layer} channels of both models",
                    fg.image_grid(
                        rows, labels, cols, cmaps=[None] + ["magma"] * (2 * k), vranges=[None] + [(0, lim)] * (2 * k)
                    ),
                    "For each image, the base model's most active channels and the same channels of "
                    "the tuned model, on one colour scale (column titles give image 0's channels).",
                )
            )
    return sec
