"""Render one self-contained HTML report from an analysis results folder.

Findings first, then one section per analysis, then methods and reproducibility.
Everything is inlined (figures as data URIs, a small script for sortable tables),
user strings are escaped by jinja2's autoescape, and the report folder (HTML +
the result tables as CSV) is written to a temporary sibling and swapped in only
when complete.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from tunelens.analysis.findings import modality_words
from tunelens.core.files import check_owned_folder, write_owned_folder
from tunelens.core.results import Results

from .model import Figure, Section, Table
from .sections import SECTION_BUILDERS

__all__ = ["render_html", "render_report"]

_TEMPLATES = Path(__file__).parent / "templates"


MISSING = "\u2013"  # an en dash: what a table cell shows for a missing value (NaN, None, pd.NA)


def _fmt(v: object) -> str:
    """One table cell as text: 4 significant digits, scientific notation for tiny or huge values, a dash
    for a missing value (never a literal NaN)."""
    if v is None or v is pd.NA or v is pd.NaT:
        return MISSING
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return MISSING
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["fmt"] = _fmt
    env.tests["figure"] = lambda b: isinstance(b, Figure)
    env.tests["table"] = lambda b: isinstance(b, Table)
    return env


def evidence_anchors(sections: list[Section]) -> dict[str, str]:
    """Where a finding's evidence is on the page. A finding names a result table; it links to the first
    figure drawn from that table, else the table itself, else a section of that id."""
    out: dict[str, str] = {}
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Figure) and b.source:
                out.setdefault(b.source, b.id)
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Table) and b.csv:
                out.setdefault(b.csv, b.id)
        out.setdefault(s.id, s.id)
    return out


def render_html(res: Results, title: str = "tunelens report") -> str:
    sections: list[Section] = []
    errors: list[str] = []
    with modality_words(str(res.summary.get("modality", "image"))):  # "test images" or "test sentences"
        for name, build in SECTION_BUILDERS:
            try:
                sec = build(res)
            except Exception as e:  # a broken section must not lose the rest of the report
                errors.append(f"section {name} could not be rendered: {type(e).__name__}: {e}")
                continue
            if sec is not None:
                sections.append(sec)
    anchors = evidence_anchors(sections)
    findings = []
    for f in res.summary.get("findings", []):
        f = dict(f)
        f["evidence"] = anchors.get(f.get("evidence") or "")
        findings.append(f)
    return (
        _env()
        .get_template("report.html.j2")
        .render(
            title=title,
            findings=findings,
            sections=sections,
            errors=errors,
            summary=res.summary,
            skipped=res.summary.get("skipped", {}),
        )
    )


def render_report(
    results_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    title: str = "tunelens report",
    stamp: dict[str, dict] | None = None,
) -> Path:
    """Write ``out_dir/index.html``, ``out_dir/tables/*.csv`` (and ``stamp``: file name -> JSON); return the HTML path (absolute, through the
    ``out_dir`` link: the path stays valid when the report is rendered again)."""
    check_owned_folder(out_dir)  # before the work: a folder tunelens did not write is never replaced
    res = Results.load(results_dir)
    page = render_html(res, title=title)

    def fill(tmp: Path) -> None:
        (tmp / "tables").mkdir()
        for name, df in res.tables.items():
            df.to_csv(tmp / "tables" / f"{name}.csv", index=False)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        for name, data in (stamp or {}).items():  # files that say what the report was rendered from
            (tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True))

    out_dir = write_owned_folder(out_dir, fill)
    return out_dir.parent.resolve() / out_dir.name / "index.html"
