"""Which changes matter: rewind criticality, the interpolation path, per-layer probes, strategies side by side."""

from __future__ import annotations

import matplotlib.pyplot as plt

from tunelens.core.results import Results

from .. import figures as fg
from ..model import Figure, Section, Table

ORDER = 40


def build(res: Results) -> Section | None:
    rw = res.table("rewind")
    it = res.table("interpolation")
    pr = res.table("probes")
    stg = res.table("strategies")
    if rw is None and it is None and pr is None and stg is None:
        return None
    sec = Section(
        "functional",
        "Which changes matter",
        "Weight deltas and CKA say where the model changed; these tests say whether those changes carry "
        "the new task. Rewind: put one stage of the tuned model back to its pretrained weights (BatchNorm "
        "statistics included) and measure the target accuracy lost (Zhang, Bengio and Singer 2019; "
        "Neyshabur et al. 2020). Interpolation: target loss along the straight line from the pretrained "
        "to the tuned weights, with the tuned head. Probes: a logistic-regression probe on each layer's "
        "pooled features (Alain and Bengio 2016).",
    )
    if stg is not None and len(stg):
        sec.blocks.append(
            Table(
                "tbl-strategies",
                "Fine-tuning strategies side by side",
                stg,
                csv="strategies",
                collapsed=False,
                caption="Target test accuracy, relative weight change per stage (rel_change_*), "
                "linear CKA to the base per stage (cka_*, when computed) and training time.",
            )
        )
    if rw is not None and len(rw):
        d = rw[~rw["group"].isin(["none"])].copy()
        d["acc_drop_points"] = 100 * d["acc_drop"]
        order = list(dict.fromkeys(d["group"]))
        sec.blocks.append(
            Figure(
                "fig-rewind",
                "Rewind: accuracy lost when one stage returns to its pretrained weights",
                fg.bar_chart(d, "group", "acc_drop_points", hue="model", order=order, ylabel="accuracy drop (points)"),
                "all_but_head = the pretrained backbone under the tuned head.",
                source="rewind",
            )
        )
        sec.blocks.append(Table("tbl-rewind", "Rewind results", rw, csv="rewind"))
    if it is not None and len(it):
        barrier = res.summary.get("interpolation", {}).get("barrier")
        fig, ax = plt.subplots(1, 2, figsize=(8, 3))
        ax[0].plot(it["alpha"], it["loss"], "o-", ms=3, label="loss along the path")
        ax[0].plot(it["alpha"], it["linear_loss"], "--", label="straight line between endpoints")
        ax[0].set_xlabel("alpha (0 = pretrained backbone, 1 = tuned)")
        ax[0].set_ylabel("target test loss")
        ax[0].legend(fontsize=7, frameon=False)
        ax[1].plot(it["alpha"], 100 * it["acc"], "o-", ms=3, color="C2")
        ax[1].set_xlabel("alpha")
        ax[1].set_ylabel("target test accuracy (%)")
        fig.tight_layout()
        cap = f"Barrier B = max excess loss = {barrier:.4f}. " if barrier is not None else ""
        cap += (
            "BatchNorm statistics re-estimated at each alpha on the first training batches."
            if it["bn"].iloc[0] == "recompute"
            else "BatchNorm statistics interpolated with the weights."
        )
        sec.blocks.append(
            Figure(
                "fig-interpolation",
                "Loss and accuracy between the pretrained and tuned weights",
                fg.fig_to_uri(fig),
                cap,
                source="interpolation",
            )
        )
        sec.blocks.append(Table("tbl-interpolation", "Interpolation path", it, csv="interpolation"))
    if pr is not None and len(pr):
        order = list(dict.fromkeys(pr.sort_values("depth")["layer"]))
        sec.blocks.append(
            Figure(
                "fig-probes",
                "Linear-probe accuracy by depth on the target task",
                fg.line_chart(pr, "layer", "test_acc", hue="model", xorder=order, ylabel="probe test accuracy"),
                "Each point is a logistic-regression probe on that layer's globally pooled, "
                "standardised features; chance is " + f"{pr['chance'].iloc[0]:.3f}.",
                source="probes",
            )
        )
        sec.blocks.append(Table("tbl-probes", "Probe accuracy per layer", pr, csv="probes"))
    return sec
