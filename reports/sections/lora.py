"""LoRA next to full fine-tuning: intruder dimensions per stage (against their random control) and the CKA between
the LoRA and the full fine-tune per stage."""

from __future__ import annotations

from tunelens.analysis.findings import units
from tunelens.core.results import Results

from .. import figures as fg
from ..model import Figure, Section, Table

ORDER = 15


def build(res: Results) -> Section | None:
    st = res.table("intruder_stages")
    cka = res.table("cka_lora")
    if (st is None or st.empty) and (cka is None or cka.empty):
        return None
    sec = Section(
        "lora",
        "Low-rank and full updates: intruder dimensions",
        "Intruder dimensions (Shuttleworth et al. 2024, 'LoRA vs Full Fine-tuning: An Illusion of Equivalence'): "
        "of the top k left singular vectors of a tuned weight matrix (conv kernels as out x in*k*k), those whose "
        "largest |cosine| with any singular vector of the pretrained matrix is below the threshold, i.e. new "
        "high-ranking directions. 'random like X' is the control: the pretrained weights plus Gaussian noise of the "
        "same Frobenius norm per matrix as X's update.",
    )
    if st is not None and len(st):
        order = list(dict.fromkeys(st["stage"]))
        sec.blocks.append(
            Figure(
                "fig-intruders",
                "Intruder dimensions per stage",
                fg.bar_chart(st, "stage", "intruders", hue="model", order=order, ylabel="intruder dimensions"),
                f"Summed over each stage's weight matrices; k = {int(res.tables['intruders']['k'].max())} per matrix, "
                f"threshold {float(st['threshold'].iloc[0])}.",
                source="intruder_stages",
            )
        )
        sec.blocks.append(Table("tbl-intruder-stages", "Intruders per stage", st, csv="intruder_stages"))
        sec.blocks.append(
            Table(
                "tbl-intruders", "Intruders per weight matrix", res.tables["intruders"], csv="intruders", collapsed=True
            )
        )
    if cka is not None and len(cka):
        sec.blocks.append(
            Figure(
                "fig-cka-lora",
                "CKA between the LoRA and the full fine-tune, per stage",
                fg.line_chart(
                    cka,
                    "layer",
                    "cka",
                    hue="model",
                    band=("ci_low", "ci_high"),
                    xorder=list(dict.fromkeys(cka["layer"])),
                    ylabel="CKA",
                ),
                f"Minibatch linear CKA on the target test {units()} between each LoRA model and the reference "
                f"({', '.join(dict.fromkeys(cka['reference']))}); 1 = the same representation up to rotation and scale.",
                source="cka_lora",
            )
        )
        sec.blocks.append(Table("tbl-cka-lora", "LoRA vs full: CKA per stage", cka, csv="cka_lora"))
    return sec
