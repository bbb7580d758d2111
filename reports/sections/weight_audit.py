"""The streaming weight audit's own tables (``tunelens weights``): per module kind, and names that did not pair."""

from __future__ import annotations

from tunelens.core.results import Results

from .. import figures as fg
from ..model import Figure, Section, Table

ORDER = 11


def build(res: Results) -> Section | None:
    kinds = res.table("weight_kinds")
    if kinds is None or kinds.empty:
        return None
    audit = res.summary.get("weight_audit", {})
    opts = audit.get("options", {})
    inputs = (
        f"Base: {audit['base']}; tuned: {audit['tuned']} ({audit.get('tuned_kind', '')}); {audit.get('tensors', '?')} "
        f"tensors, read one at a time by {audit.get('processes', 1)} process(es) in {audit.get('seconds', 0):.1f} s. "
        if "base" in audit
        else ""
    )
    sec = Section(
        "weight-audit",
        "Weight audit: module kinds, update sparsity, ranks and intruders",
        inputs + "Pooled over each kind of module (attention q/k/v/o, MLP gate/up/down, norms, embeddings, lm_head). "
        "changed_share: the share of entries changed by more than the stored dtype's rounding "
        "(|dW| > eps/2 |W0|); stable rank ||dW||_F^2/s_1^2 and effective rank exp(H(s/sum s)) of the update, exact for "
        f"matrices up to {opts.get('exact_max_numel', '?')} entries and from the top {opts.get('rank_k', '?')} "
        "singular values (randomized) above; intruders: top directions of the tuned matrix with max |cos| below "
        f"{opts.get('intruder_threshold', '?')} to the base's directions (Shuttleworth et al. 2024).",
    )
    k = kinds.dropna(subset=["relative"])
    if len(k):
        sec.blocks.append(
            Figure(
                "fig-weight-kinds",
                "Relative change per module kind",
                fg.bar_chart(
                    k, "module_kind", "relative", hue="model", ylabel="sqrt(sum ||dW||^2) / sqrt(sum ||W0||^2)"
                ),
                "All tensors of a kind pooled, across layers.",
                source="weight_kinds",
            )
        )
    sec.blocks.append(Table("tbl-weight-kinds", "Per module kind", kinds, csv="weight_kinds", collapsed=False))
    pairs = res.table("weight_pairing")
    if pairs is not None and len(pairs):
        sec.blocks.append(
            Table(
                "tbl-weight-pairing",
                "Names paired across a prefix (renamed), or not paired (missing, extra)",
                pairs,
                csv="weight_pairing",
            )
        )
    return sec
