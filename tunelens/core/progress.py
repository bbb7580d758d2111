"""One progress line for a whole run (``tunelens run``, ``tunelens compare``): the stage running, the share of
the predicted work done, the time elapsed and an ETA (tqdm).

The run plans its stages with predicted seconds (:func:`run_progress`); each stage reports the fraction of
it that is done (:func:`report`: training after every epoch, the analyses after each one, weighted by
their predicted cost). tqdm's ETA is the remaining predicted work at the speed measured so far, so a
prediction that is off by a constant factor still gives the right ETA once the first stage has run. While
the line is shown, the per-epoch and per-method bars of the stages stay off (:func:`active`), so the
terminal holds one line; ``--no-progress`` turns everything off.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from tqdm.auto import tqdm

__all__ = ["RunProgress", "active", "replan", "report", "run_progress"]

_CURRENT: RunProgress | None = None


class RunProgress:
    """A tqdm line over stages weighted by predicted seconds."""

    def __init__(self, plan: Mapping[str, float], enabled: bool = True, title: str = "tunelens") -> None:
        self.plan = {k: max(0.0, float(v)) for k, v in plan.items()}
        self.done = dict.fromkeys(self.plan, 0.0)
        self.title = title
        self.bar = tqdm(
            total=max(sum(self.plan.values()), 1e-9),
            desc=title,
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
        )

    def set(self, stage: str, fraction: float, label: str | None = None) -> None:
        """``fraction`` (0..1) of ``stage`` is done; ``label`` is shown after the stage name."""
        if stage not in self.plan:  # an unplanned stage: it takes no share of the line
            self.plan[stage], self.done[stage] = 0.0, 0.0
        target = self.plan[stage] * min(max(float(fraction), 0.0), 1.0)
        delta = target - self.done[stage]
        self.bar.set_description_str(f"{self.title}: {stage}" + (f" ({label})" if label else ""), refresh=False)
        if delta > 0:
            self.done[stage] = target
            self.bar.update(delta)
        else:
            self.bar.refresh()

    def replan(self, stage: str, seconds: float) -> None:
        """A better prediction of ``stage`` (e.g. from timed passes): the line's total changes with it."""
        seconds = max(0.0, float(seconds))
        old = self.plan.get(stage, 0.0)
        self.plan[stage] = seconds
        self.done.setdefault(stage, 0.0)
        self.done[stage] = min(self.done[stage], seconds)
        self.bar.total = max(self.bar.total + seconds - old, 1e-9)
        self.bar.refresh()

    def write(self, message: str) -> None:
        """A log line above the progress line (print would tear the line apart)."""
        if self.bar.disable:
            print(message)
        else:
            tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        for stage in self.plan:
            self.set(stage, 1.0)
        self.bar.close()


@contextmanager
def run_progress(plan: Mapping[str, float], enabled: bool = True, title: str = "tunelens") -> Iterator[RunProgress]:
    """Show one line for the run while the block runs (a no-op line when ``enabled`` is false)."""
    global _CURRENT
    line = RunProgress(plan, enabled=enabled, title=title)
    previous, _CURRENT = _CURRENT, (line if enabled else None)
    try:
        yield line
        line.close()
    finally:
        if not line.bar.disable:
            line.bar.close()
        _CURRENT = previous


def active() -> bool:
    """Whether a run's progress line is shown (then the stages show no bars of their own)."""
    return _CURRENT is not None


def report(stage: str, fraction: float = 1.0, label: str | None = None) -> None:
    """Tell the run's line that ``fraction`` of ``stage`` is done (nothing when no line is shown)."""
    if _CURRENT is not None:
        _CURRENT.set(stage, fraction, label)


def replan(stage: str, seconds: float) -> None:
    """A better prediction of ``stage``'s seconds for the run's line (nothing when no line is shown)."""
    if _CURRENT is not None:
        _CURRENT.replan(stage, seconds)
