"""Command-line flags shared by ``tunelens run`` and ``tunelens compare``."""

from __future__ import annotations

import argparse

__all__ = ["add_budget_argument", "parse_budget"]


def add_budget_argument(p: argparse.ArgumentParser) -> None:
    """``--budget SECONDS|auto|none``: the time budget of the analysis stage (analysis.budget)."""
    p.add_argument(
        "--budget",
        type=parse_budget,
        default=None,
        metavar="SECONDS",
        help="seconds for the analyses: the costly ones (attribution, interventions) are sized to fit after "
        "one batch is timed, and the report lists what was reduced; auto (default) = 120 on a CPU, no limit on "
        "CUDA; none = no limit",
    )


def parse_budget(text: str) -> float | str:
    """``--budget``'s value: positive seconds, ``auto`` or ``none``."""
    if text in ("auto", "none"):
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (e.g. 120), auto or none, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"the budget must be positive seconds, got {text!r}")
    return v
