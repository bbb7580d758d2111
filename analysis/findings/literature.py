"""The transfer-learning literature's three expectations, checked on any network's first and last stage.

* early layers change least under fine-tuning (Yosinski et al. 2014, "How transferable are features
  in deep neural networks?"; Neyshabur et al. 2020, "What is being transferred in transfer learning?");
* rewinding an early stage to its pretrained weights costs less than rewinding a late one (Zhang,
  Bengio & Singer 2019, "Are all layers created equal?"; Neyshabur et al. 2020);
* linear-probe accuracy gains more late than early (Kumar et al. 2022, "Fine-tuning can distort
  pretrained features").

"Early" is the stem with the first stage after it, "late" the last stage before the classifier, read
from the stages of the weight table (forward order): for a ResNet ``stem`` + ``layer1`` against
``layer4``; for timm's EfficientNet ``stem`` + ``blocks.0`` against ``conv_head`` (its 1x1 convolution
after the last block, the counterpart of ``layer4``'s output). Each check is stated with its
numbers whichever way it comes out; one that fails carries ``[not as expected]``.

For transformer text encoders (:func:`merchant_checks`) one more expectation, read on the encoder layers
(the body stages, embeddings and head left out): fine-tuning changes the lower layers least and the top
layers most (Merchant, Rahimtoroghi, Pavlick & Tenney 2020, "What Happens To BERT Embeddings During
Fine-tuning?", who find the change concentrated in the top layers). Checked twice, on the relative weight
change and on the representations (``1 - CKA`` of base and tuned on the attention-masked mean of each
layer's tokens): the mean over the lower third of the layers against the top third, with the Spearman
correlation of change with depth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from tunelens.core.naming import stage_of

__all__ = ["NOT_AS_EXPECTED", "early_late_stages", "literature_checks", "merchant_checks"]

NOT_AS_EXPECTED = " [not as expected]"


def early_late_stages(stages: list[str]) -> tuple[list[str], str, str] | None:
    """``(early stages, first stage after the stem, last stage)`` of backbone ``stages`` in forward order
    (the classifier ``head`` left out); None for fewer than three stages."""
    s = [x for x in stages if x != "head"]
    if len(s) < 3:
        return None
    first = s[1] if s[0] == "stem" else s[0]
    early = [s[0], first] if s[0] == "stem" else [first]
    return early, first, s[-1]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def literature_checks(
    rewind: pd.DataFrame | None, gains: pd.DataFrame | None, stages: pd.DataFrame | None, primary: str
) -> list[str]:
    """One sentence per expectation that the tables allow checking (weights, rewind, probe gain)."""
    order: list[str] = []
    s = None
    if stages is not None and len(stages):
        s = stages[stages["model"] == primary].sort_values("depth", kind="stable")
        order = list(dict.fromkeys(s["stage"]))
    if not order and rewind is not None and len(rewind):
        r = rewind[rewind["model"] == primary]
        order = [g for g in dict.fromkeys(r["group"]) if g not in ("none", "all_but_head")]
    el = early_late_stages(order)
    if el is None:
        return []
    early, first, last = el
    checks = []
    if s is not None and len(s):
        rel = s.set_index("stage")["relative"]
        if set(early) | {last} <= set(rel.index):
            e, late = float(rel.loc[early].mean()), float(rel.loc[last])
            ok = e < late
            names = " and ".join(early)
            checks.append(
                f"early layers change {'least' if ok else 'not least'} (mean relative change of {names} "
                f"{_pct(e)} vs {last} {_pct(late)})" + ("" if ok else NOT_AS_EXPECTED)
            )
    if rewind is not None and len(rewind):
        r = rewind[rewind["model"] == primary].set_index("group")["acc_drop"]
        if first in r.index and last in r.index:
            a, b = float(r.loc[first]), float(r.loc[last])
            ok = a < b
            checks.append(
                f"rewinding {first} costs {'less' if ok else 'no less'} than rewinding {last} "
                f"({100 * a:.1f} vs {100 * b:.1f} points)" + ("" if ok else NOT_AS_EXPECTED)
            )
    if gains is not None and len(gains):
        g = gains.sort_values("depth", kind="stable")
        by_stage = g if "stage" in g else g.assign(stage=[stage_of(str(n)) for n in g["layer"]])
        lo = by_stage[by_stage["stage"] == first]
        hi = by_stage[by_stage["stage"] == last]
        if len(lo) and len(hi):
            lo_r, hi_r = lo.iloc[-1], hi.iloc[-1]
            ok = hi_r["gain"] > lo_r["gain"]
            at_hi = hi_r["layer"] if hi_r["layer"] == last else f"{hi_r['layer']} ({last})"
            at_lo = lo_r["layer"] if lo_r["layer"] == first else f"{lo_r['layer']} ({first})"
            checks.append(
                f"the probe gain is {'larger' if ok else 'not larger'} at {at_hi} than at {at_lo} "
                f"({hi_r['gain']:+.1f} vs {lo_r['gain']:+.1f} points)" + ("" if ok else NOT_AS_EXPECTED)
            )
    return checks


def _depth_check(what: str, names: list[str], change: list[float], digits: int, as_pct: bool) -> str | None:
    """Lower third vs top third of ``change`` (per layer, in depth order) and the Spearman correlation with depth."""
    if len(change) < 3 or not np.isfinite(change).all():
        return None
    third = max(len(change) // 3, 1)
    lo, hi = float(np.mean(change[:third])), float(np.mean(change[-third:]))
    ok = lo < hi
    fmt = (lambda x: f"{100 * x:.{digits}f}%") if as_pct else (lambda x: f"{x:.{digits}f}")
    rho = float(spearmanr(np.arange(len(change)), change).statistic) if np.std(change) > 0 else float("nan")
    corr = f"; Spearman correlation of change with depth {rho:+.2f}" if np.isfinite(rho) else ""
    return (
        f"by {what}, the lower encoder layers change {'less' if ok else 'no less'} than the top ones, as Merchant "
        f"et al. (2020) report for fine-tuned BERT ({', '.join(names[:third])} {fmt(lo)} vs "
        f"{', '.join(names[-third:])} {fmt(hi)}{corr})" + ("" if ok else NOT_AS_EXPECTED)
    )


def merchant_checks(
    stages: pd.DataFrame | None, cka: pd.DataFrame | None, layer_stages: dict[str, str], primary: str
) -> list[str]:
    """Merchant et al. (2020) on a transformer encoder's layers: by relative weight change (``stages``, the weight
    table per stage) and by ``1 - CKA`` on the masked mean (``cka``, the CKA-vs-chance table; ``layer_stages``
    maps its layers to stages). The encoder layers are the stages between ``stem`` and ``head``."""
    out: list[str] = []
    if stages is None or not len(stages):
        return out
    s = stages[stages["model"] == primary].sort_values("depth", kind="stable")
    body = [x for x in dict.fromkeys(s["stage"]) if x not in ("stem", "head")]
    if len(body) < 3:
        return out
    rel = s.set_index("stage")["relative"]
    w = _depth_check("weights (relative change)", body, [float(rel.loc[b]) for b in body], 3, True)
    if w:
        out.append(w)
    if cka is not None and len(cka):
        c = cka[cka["model"] == primary] if "model" in cka else cka
        if "pooling" in c:
            c = c[c["pooling"] == "masked mean"]
        per = {layer_stages.get(str(r["layer"])): float(r["cka_base_tuned"]) for _, r in c.iterrows()}
        if all(b in per for b in body):
            r = _depth_check("representations (1 - CKA on the masked mean)", body, [1 - per[b] for b in body], 3, False)
            if r:
                out.append(r)
    return out
