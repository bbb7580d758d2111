"""Methods and reproducibility: configuration, seeds, versions, checkpoint hashes, timings."""

from __future__ import annotations

import json

import pandas as pd

from tunelens.core.results import Results

from ..model import Section, Table

ORDER = 100


def build(res: Results) -> Section:
    s = res.summary
    sec = Section(
        "methods",
        "Methods and reproducibility",
        "Everything needed to reproduce these numbers: the configuration, seeds, library versions, the "
        "sha256 of every checkpoint, and how long each stage took.",
    )
    st = s.get("stages", {})
    if st.get("stages"):
        roles = st.get("layers", {})
        rows = []
        for g in st["stages"]:
            cka = [k for k, v in roles.items() if v == g["name"]]
            if g["kind"] == "head":
                cka = [f"{k} ({v})" for k, v in roles.items() if v in ("pooled", "logits")]
            rows.append(
                {
                    "stage": g["name"],
                    "modules": ", ".join(g["modules"]),
                    "resolution": "x".join(map(str, g["resolution"])) if g["resolution"] else "pooled",
                    "layout": g["layout"],
                    "CKA / probe layers": ", ".join(cka),
                }
            )
        gl = st.get("gradcam_layer") or st.get("gradcam_reason", "")
        sec.blocks.append(
            Table(
                "tbl-stages",
                f"Stages (found by {st.get('method', '')} on an input of shape "
                f"{'x'.join(map(str, st.get('input_shape', [])))}); Grad-CAM layer: {gl}",
                pd.DataFrame(rows),
            )
        )
    _budget(sec, s.get("budget") or {})
    ck = s.get("checkpoints", {})
    if ck:
        sec.blocks.append(
            Table(
                "tbl-checkpoints",
                "Checkpoints",
                pd.DataFrame([{"model": k, **v} for k, v in ck.items()]),
                collapsed=True,
            )
        )
    tm = s.get("timings", {})
    if tm:
        sec.blocks.append(
            Table(
                "tbl-timings",
                "Timings (seconds)",
                pd.DataFrame([{"stage": k, "seconds": v} for k, v in tm.items()]),
                collapsed=True,
            )
        )
    ver = s.get("versions", {})
    if ver:
        sec.blocks.append(
            Table(
                "tbl-versions",
                "Versions",
                pd.DataFrame([{"package": k, "version": v} for k, v in ver.items()]),
                collapsed=True,
            )
        )
    if "config" in s:
        sec.code.append(("Configuration", json.dumps(s["config"], indent=2, sort_keys=True)))
    return sec


def _budget(sec: Section, b: dict) -> None:
    """The time budget: what it was, the measured pass costs, and every setting it reduced (or that none was)."""
    if not b:
        return
    if b.get("seconds") is None:
        sec.notes.append(f"Time budget: none ({b.get('note') or 'no limit'}).")
        return
    pc = b.get("pass_costs") or {}
    pred = ", ".join(
        f"{k} predicted {v:.0f} s, took {b.get('measured', {}).get(k, float('nan')):.0f} s"
        for k, v in b.get("predicted", {}).items()
    )
    head = (
        f"Time budget: {b['seconds']:g} s for the analyses (--budget). One image costs "
        f"{1e3 * pc.get('forward_s', 0):.1f} ms forward and {1e3 * pc.get('backward_s', 0):.1f} ms forward + "
        f"backward (timed on {pc.get('batch', 0)} test images of the base model)" + (f"; {pred}" if pred else "") + "."
    )
    if b.get("over_budget"):
        head += f" Note: {b['over_budget']}."
    red = b.get("reduced") or []
    if not red:
        sec.notes.append(head + " Nothing was reduced: every analysis ran as configured.")
        return
    sec.notes.append(head + f" {len(red)} setting(s) were reduced to fit it (table below).")
    sec.blocks.append(
        Table(
            "tbl-budget",
            "Reduced to fit the time budget",
            pd.DataFrame(
                [
                    {
                        "analysis": r["analysis"],
                        "setting": r["setting"],
                        "configured": str(r["before"]),
                        "used": str(r["after"]),
                        "effect on the findings": r["effect"],
                    }
                    for r in red
                ]
            ),
            collapsed=False,
        )
    )
