"""One progress line for a whole run (``tunelens run``, ``tunelens compare``): the stage running, the share of
the predicted work done, the time elapsed and an ETA (tqdm).

The run plans its stages with predicted seconds (:func:`run_progress`); each stage reports the fraction of
it that is done (:func:`report`: training after every epoch, the analyses after each one, weighted by
their predicted cost). tqdm's ETA is the remaining predicted work at the speed measured so far, so a
prediction that is off by a constant factor still gives the right ETA once the first stage has run. While
the line is shown, the per-epoch and per-method bars of the stages stay off (:func:`active`), so the
terminal holds one line; ``--no-progress`` turns everything off. When the stream is not a terminal (a log
file, CI), the line is written as plain lines instead, one when each stage (or each step a stage names, such
as an analysis or an epoch) starts and one at the end, with no carriage-return frames. The line ends once, at 100%, without stepping back through the stages already done.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TextIO

from tqdm.auto import tqdm

__all__ = ["RunProgress", "active", "replan", "report", "run_progress"]

_CURRENT: RunProgress | None = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or exotic streams
        return False


class RunProgress:
    """A tqdm line over stages weighted by predicted seconds (plain lines when ``stream`` is not a terminal)."""

    def __init__(
        self, plan: Mapping[str, float], enabled: bool = True, title: str = "tunelens", stream: TextIO | None = None
    ) -> None:
        self.plan = {k: max(0.0, float(v)) for k, v in plan.items()}
        self.done = dict.fromkeys(self.plan, 0.0)
        self.title = title
        self.stream = stream if stream is not None else sys.stderr
        self.plain = enabled and not _is_terminal(self.stream)
        self._started = time.monotonic()
        self._shown: str | None = None  # the stage the last plain line named
        self.bar = tqdm(
            total=self.total,
            desc=title,
            disable=not enabled or self.plain,
            file=self.stream,
            dynamic_ncols=True,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
        )

    @property
    def total(self) -> float:
        """Predicted seconds of the whole run."""
        return max(sum(self.plan.values()), 1e-9)

    @property
    def n(self) -> float:
        """Predicted seconds of the work done."""
        return sum(self.done.values())

    def _plain_line(self, text: str) -> None:
        elapsed = time.monotonic() - self._started
        pct = 100.0 * min(self.n / self.total, 1.0)
        print(f"{self.title}: {text} ({pct:3.0f}% of the run, {elapsed:.0f} s)", file=self.stream, flush=True)

    def set(self, stage: str, fraction: float, label: str | None = None) -> None:
        """``fraction`` (0..1) of ``stage`` is done; ``label`` is shown after the stage name."""
        if stage not in self.plan:  # an unplanned stage: it takes no share of the line
            self.plan[stage], self.done[stage] = 0.0, 0.0
        shown = stage + (f" ({label})" if label else "")
        if self.plain and shown != self._shown:  # a stage (or a step of it) starts: one line, with the share done
            self._shown = shown
            self._plain_line(shown)
        target = self.plan[stage] * min(max(float(fraction), 0.0), 1.0)
        delta = target - self.done[stage]
        if delta > 0:
            self.done[stage] = target
        if self.plain:
            return
        self.bar.set_description_str(f"{self.title}: {stage}" + (f" ({label})" if label else ""), refresh=False)
        if delta > 0:
            self.bar.update(delta)
        else:
            self.bar.refresh()

    def replan(self, stage: str, seconds: float) -> None:
        """A better prediction of ``stage`` (e.g. from timed passes): the line's total changes with it."""
        seconds = max(0.0, float(seconds))
        self.plan[stage] = seconds
        self.done.setdefault(stage, 0.0)
        self.done[stage] = min(self.done[stage], seconds)
        self.bar.total = self.total
        self.bar.n = self.n
        self.bar.refresh()

    def write(self, message: str) -> None:
        """A log line above the progress line (print would tear the line apart)."""
        if self.bar.disable:
            print(message)
        else:
            tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        """The run is over: the line goes to 100% once, named ``done`` (not stepping back through the stages)."""
        for stage in self.plan:
            self.done[stage] = self.plan[stage]
        if self.plain:
            self._plain_line("done")
            return
        self.bar.set_description_str(f"{self.title}: done", refresh=False)
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


@contextmanager
def run_progress(
    plan: Mapping[str, float], enabled: bool = True, title: str = "tunelens", stream: TextIO | None = None
) -> Iterator[RunProgress]:
    """Show one line for the run while the block runs (a no-op line when ``enabled`` is false)."""
    global _CURRENT
    line = RunProgress(plan, enabled=enabled, title=title, stream=stream)
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
