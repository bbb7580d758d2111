"""tunelens.analysis.findings: plain-language findings from result tables.

``model``: the :class:`Finding`, its checks and ranking; ``wording``: the words of the modality (images or
sentences); ``caveats``: what qualifies every finding of a run; ``literature``: the expectations from the
literature, checked on the tables. Each analysis words its own findings (``findings(results)`` of its step in
``tunelens.analysis.steps``), with these pieces.

May import: ``tunelens.core``, numpy and pandas only: findings read tables, never models (no torch, no measures,
no engine, no steps).
"""

from tunelens.analysis.findings.caveats import MIN_TEST_IMAGES, small_data_caveat
from tunelens.analysis.findings.model import Finding, checked, paired_bootstrap_diff, pct, rank_findings, span
from tunelens.analysis.findings.wording import modality, modality_words, units, word

__all__ = [
    "MIN_TEST_IMAGES",
    "Finding",
    "checked",
    "modality",
    "modality_words",
    "paired_bootstrap_diff",
    "pct",
    "rank_findings",
    "small_data_caveat",
    "span",
    "units",
    "word",
]
