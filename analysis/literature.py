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
"""

from __future__ import annotations

import pandas as pd

from tunelens.core.naming import stage_of

__all__ = ["NOT_AS_EXPECTED", "early_late_stages", "literature_checks"]

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
