"""Report sections, one module each, found automatically and laid out by each module's ``ORDER``.

A section module defines ``ORDER`` (its place on the page) and ``build(results) -> Section | None``
(None when the results hold nothing for it). It reads the tables by the names its analysis declares
(constants in ``tunelens.analysis.steps``). A broken section never loses the rest of the report.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from tunelens.core.results import Results

from ..model import Section

__all__ = ["SECTION_BUILDERS", "section_builders"]


def section_builders() -> list[tuple[str, Callable[[Results], Section | None]]]:
    """``(name, build)`` of every section module of this package, in page order."""
    mods = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
    mods.sort(key=lambda m: (getattr(m, "ORDER", 50), m.__name__))
    return [(m.__name__.rpartition(".")[2], m.build) for m in mods if hasattr(m, "build")]


SECTION_BUILDERS = section_builders()
