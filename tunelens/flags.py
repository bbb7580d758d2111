"""Command-line flags shared by ``tunelens run`` and ``tunelens compare``."""

from __future__ import annotations

import argparse
import math

from tunelens.config_validation import MIN_SECONDS as MIN_BUDGET

__all__ = ["MAX_SEED", "add_budget_argument", "parse_budget", "parse_seed"]

MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


def parse_seed(text: str) -> int:
    """``--seed``'s value: an integer from 0 to :data:`MAX_SEED`."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"the seed must lie between 0 and {MAX_SEED}, got {text}")
    return v


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
    """``--budget``'s value: finite seconds of at least :data:`MIN_BUDGET`, ``auto`` or ``none``."""
    if text in ("auto", "none"):
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (e.g. 120), auto or none, got {text!r}") from None
    if not (math.isfinite(v) and v >= MIN_BUDGET):
        raise argparse.ArgumentTypeError(
            f"the budget must be finite seconds of at least {MIN_BUDGET:g} (or none for no limit), got {text!r}"
        )
    return v
