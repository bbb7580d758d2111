"""Warnings as the command line shows them: one line each, once, without file paths or source lines.

Python's default ``showwarning`` prints the warning's file, line number and source line, and a long message
whole (a :class:`~tunelens.analysis.measures.cka.StreamingCKA` warning about many layers can reach kilobytes).
Inside :func:`warning_lines`, a warning raised from tunelens' own code prints as ``tunelens: warning: ...``,
folded to one line, cut at :data:`MAX_CHARS`, and once per distinct text; warnings that libraries
(torch, matplotlib, transformers) raise about their own internals are not shown. ``TUNELENS_DEBUG=1`` restores
Python's default display.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

__all__ = ["MAX_CHARS", "is_own_file", "warning_lines"]

MAX_CHARS = 400
_PACKAGES = ("tunelens", "tunelens.analysis", "tunelens.finetune", "tunelens.reports")


def _roots() -> list[str]:
    """The folders of tunelens' loaded packages (the repository keeps them side by side, not nested)."""
    out = []
    for name in _PACKAGES:
        f = getattr(sys.modules.get(name), "__file__", None)
        if f:
            out.append(str(Path(f).resolve().parent))
    return out


def is_own_file(filename: str) -> bool:
    """Whether a warning's ``filename`` lies in tunelens' own packages."""
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    return any(path == r or path.startswith(r + os.sep) for r in _roots())


@contextmanager
def warning_lines(stream: TextIO | None = None) -> Iterator[None]:
    """Show tunelens' warnings as single lines on ``stream`` (stderr) while the block runs."""
    if os.environ.get("TUNELENS_DEBUG", "") not in ("", "0"):
        yield
        return
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not is_own_file(filename):
            return
        text = " ".join(str(message).split())
        if len(text) > MAX_CHARS:
            text = text[: MAX_CHARS - 1].rstrip() + "\u2026"
        if text in seen:
            return
        seen.add(text)
        print(f"tunelens: warning: {text}", file=stream if stream is not None else sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield
