"""Caveats that qualify every finding of a run: too few test images (or sentences) for differences of a few
points to mean much."""

from __future__ import annotations

from tunelens.analysis.findings.model import Finding
from tunelens.analysis.findings.wording import units

__all__ = ["MIN_TEST_IMAGES", "small_data_caveat"]

#: below this many test images the report opens with a caveat: a difference of one image is 1 point at 100,
#: the two-standard-error noise of an accuracy near 80% about 11 points, and bootstrap CIs over fewer images
#: are unstable (percentile intervals need tens of distinct resamples)
MIN_TEST_IMAGES = 100


def small_data_caveat(findings: list[Finding], n_test: int | None) -> list[Finding]:
    """Below :data:`MIN_TEST_IMAGES` test images: a caveat that leads the list, and every finding read from
    sampled data (all but the exact weight deltas) says so in its uncertainty."""
    if n_test is None or n_test >= MIN_TEST_IMAGES:
        return findings
    out = [
        Finding(
            "small_data",
            f"Caveat: only {n_test} test {units()} (fewer than {MIN_TEST_IMAGES}). Accuracy differences of several "
            f"points, CKA and attribution changes read from so few {units()} are within sampling noise; the findings "
            "below that depend on the data say so.",
            "accuracy",
            score=100,
            kind="caveat",
        )
    ]
    for f in findings:
        if f.evidence == "weight_stages":
            out.append(f)
            continue
        unc = f"few test {units()} ({n_test} < {MIN_TEST_IMAGES})" + (f"; {f.uncertainty}" if f.uncertainty else "")
        out.append(Finding(f.id, f.text, f.evidence, f.score, unc, f.kind))
    return out
