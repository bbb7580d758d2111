"""Forgetting: the source accuracy each tuned backbone kept (under the base head, and by a linear probe), and the
stages whose rewinding restores it."""

from __future__ import annotations

from tunelens.analysis.findings import units
from tunelens.core.results import Results

from .. import figures as fg
from ..model import Figure, Section, Table

ORDER = 45


def build(res: Results) -> Section | None:
    fgt = res.table("forgetting")
    if fgt is None or fgt.empty:
        return None
    sec = Section(
        "forgetting",
        "Forgetting of the source task",
        "What each fine-tune cost the model on what it knew before. Head: the tuned backbone read by the base "
        f"model's own (source) head, scored on the source test {units()}. Probe: a logistic-regression probe fitted "
        f"on the backbone's pooled features of source training {units()}: what is still linearly decodable. Drops are "
        "against the base model, with 95% paired-bootstrap intervals.",
    )
    long = fgt.melt("model", ["head_drop", "probe_drop"], "measure", "drop")
    long["drop_points"] = 100 * long["drop"]
    long["measure"] = long["measure"].str.replace("_drop", "", regex=False)
    sec.blocks.append(
        Figure(
            "fig-forgetting",
            "Source accuracy lost by each tuned model",
            fg.bar_chart(long, "model", "drop_points", hue="measure", ylabel="source accuracy drop (points)"),
            "Head = base head on the tuned backbone; probe = a new linear probe on the pooled features.",
            source="forgetting",
        )
    )
    sec.blocks.append(Table("tbl-forgetting", "Forgetting per model", fgt, csv="forgetting", collapsed=False))
    rw = res.table("forgetting_rewind")
    if rw is not None and len(rw):
        d = rw.copy()
        d["restored_points"] = 100 * d["restored"]
        sec.blocks.append(
            Figure(
                "fig-forgetting-rewind",
                "Source accuracy restored by rewinding one stage",
                fg.bar_chart(
                    d,
                    "group",
                    "restored_points",
                    hue="model",
                    order=list(dict.fromkeys(d["group"])),
                    ylabel="source accuracy restored (points)",
                ),
                "One stage of the tuned backbone set back to its pretrained weights (BatchNorm statistics included), "
                "under the base head; all_but_head = the base backbone.",
                source="forgetting_rewind",
            )
        )
        sec.blocks.append(Table("tbl-forgetting-rewind", "Rewind on the source task", rw, csv="forgetting_rewind"))
    return sec
