"""Weight deltas: per-layer relative change by depth, per-stage aggregates, first-layer filters, the full table."""

from __future__ import annotations

from tunelens.core.results import Results

from .. import figures as fg
from ..model import Figure, Section, Table

ORDER = 10


def build(res: Results) -> Section | None:
    wd = res.table("weight_deltas")
    if wd is None or wd.empty:
        return None
    sec = Section(
        "weights",
        "Weight deltas",
        "How far each weight tensor moved from the pretrained model: relative change "
        "||W1 - W0||_F / ||W0||_F, cosine between old and new weights, and the spectral shape of the "
        "change (stable rank ||dW||_F^2/||dW||_2^2, effective rank, share of energy in the top singular "
        "direction). Conv kernels are read as out x (in*k*k) matrices.",
    )
    sub = res.table("weight_submodules")
    if sub is not None and len(sub):
        primary = res.summary.get("primary", "full")
        p = sub[(sub["model"] == primary) & (sub["submodule"] != "head")]
        if len(p):
            mat = p.pivot_table(index="submodule", columns="stage", values="relative", sort=False)
            mat = mat[[c for c in dict.fromkeys(p["stage"]) if c in mat.columns]]
            sec.blocks.append(
                Figure(
                    "fig-weight-submodules",
                    f"{primary}: relative change per encoder layer and sub-module",
                    fg.heatmap(mat * 100, fmt=".2f", xlabel="stage", ylabel="sub-module", cmap="magma"),
                    "||W_t - W_b||_F / ||W_b||_F in percent, weights and biases of a kind pooled; "
                    "blank where a layer has no such sub-module.",
                    source="weight_submodules",
                )
            )
            sec.blocks.append(Table("tbl-weight-submodules", "Per layer and sub-module", sub, csv="weight_submodules"))
    rep = wd[wd["status"] == "replaced"]["name"].unique()
    if len(rep):
        sec.notes.append(f"Replaced, not compared (different shape in the tuned model): {', '.join(map(str, rep))}.")
    w = wd[(wd["kind"] == "weight") & (wd["status"] == "compared")].copy()
    if len(w):
        w["layer"] = w["name"].str.replace(".weight", "", regex=False)
        order = list(dict.fromkeys(w["layer"]))
        sec.blocks.append(
            Figure(
                "fig-weight-depth",
                "Relative change of each weight matrix, by depth",
                fg.line_chart(
                    w,
                    "layer",
                    "relative",
                    hue="model",
                    xorder=order,
                    logy=True,
                    ylabel="||dW||_F / ||W0||_F",
                    size=(max(6.4, 0.22 * len(order)), 3.4),
                ),
                "One point per weight tensor in forward order (log scale).",
            )
        )
    st = res.table("weight_stages")
    if st is not None and len(st):
        order = list(dict.fromkeys(st.sort_values("depth")["stage"]))
        sec.blocks.append(
            Figure(
                "fig-weight-stages",
                "Relative change per stage",
                fg.bar_chart(
                    st.dropna(subset=["relative"]),
                    "stage",
                    "relative",
                    hue="model",
                    order=order,
                    ylabel="sqrt(sum ||dW||^2) / sqrt(sum ||W0||^2)",
                ),
                "Stage aggregate: the norm of all of a stage's weight changes over the norm of its pretrained weights "
                "(BatchNorm running statistics excluded).",
                source="weight_stages",
            )
        )
        sec.blocks.append(Table("tbl-weight-stages", "Per-stage aggregate", st, csv="weight_stages"))
    fc = res.arrays.get("first_conv")
    if fc is not None:
        name = res.summary.get("first_conv_name", "first convolution")
        sec.blocks.append(
            Figure(
                "fig-filters",
                f"First-layer filters ({name}) of base and tuned ({res.summary.get('primary', '')})",
                fg.filter_grid(fc["base"], fc["tuned"], fc["delta"]),
                "Top two rows: kernels shown as RGB on one shared scale for both models; bottom row: magnitude of the "
                "change summed over input channels.",
            )
        )
    sec.blocks.append(
        Table(
            "tbl-weight-deltas",
            "Every tensor",
            wd,
            csv="weight_deltas",
            caption="Click a column header to sort.",
            collapsed=True,
        )
    )
    return sec
