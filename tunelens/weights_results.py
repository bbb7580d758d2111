"""The results folder and report of ``tunelens weights``: the audit's tables, summary and findings, written
atomically (:meth:`tunelens.core.results.Results.save`, :func:`tunelens.reports.render.render_report`)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import pandas as pd

__all__ = ["audit_results", "write_audit"]


def audit_results(plan, table: pd.DataFrame, opts, model: str):
    """:class:`~tunelens.core.results.Results` holding ``weight_deltas`` (per tensor, with a ``model`` column),
    ``weight_stages`` (per layer), ``weight_kinds`` (per module kind), ``weight_submodules`` (the heat map's) and
    ``weight_pairing``, and the findings."""
    from tunelens.analysis.engine.audit_tables import aggregate_audit, audit_findings, pairing_table, submodule_table
    from tunelens.analysis.steps.weights import weight_findings
    from tunelens.core.results import Results

    t = table.copy()
    t.insert(0, "model", model)
    stages = aggregate_audit(t, "stage")
    kinds = aggregate_audit(t, "module_kind")
    pairs = pairing_table(plan.pairing)
    found = weight_findings(stages, primary=model) + audit_findings(t, kinds, pairs, model)
    res = Results(
        tables={
            "weight_deltas": t,
            "weight_stages": stages,
            "weight_kinds": kinds,
            "weight_submodules": submodule_table(t),
            "weight_pairing": pairs,
        }
    )
    res.summary.update(
        primary=model,
        tuned=[model],
        findings=sorted((f.to_dict() for f in found), key=lambda f: -(f.get("score") or 0)),
        weight_audit={"options": asdict(opts)},
    )
    return res


def write_audit(out: Path, plan, table: pd.DataFrame, opts, args: argparse.Namespace, seconds: float) -> Path:
    """Write ``out/results/`` and ``out/report/``; return the report's path."""
    from tunelens.compare.plan import tuned_names
    from tunelens.core.files import versions
    from tunelens.core.runtime import world_size
    from tunelens.reports.render import render_report

    res = audit_results(plan, table, opts, tuned_names([str(args.tuned).rstrip("/")])[0])
    res.summary["weight_audit"].update(
        base=str(args.base),
        tuned=str(args.tuned),
        tuned_kind="PEFT LoRA adapter" if plan.adapter is not None else plan.tuned.kind,
        tensors=len(table),
        processes=world_size(),
        seconds=seconds,
    )
    res.summary["versions"] = versions()
    res.summary["timings"] = {"weight_audit": seconds}
    res.save(out / "results")
    return render_report(out / "results", out / "report", title="tunelens weight audit")
