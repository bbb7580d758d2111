"""``compare --classes NAME,NAME,...``: the head's output order, by class name.

By default the data's classes are its sorted names (image sub-folders, CSV labels), and class ``i`` is the head's
``i``-th output. A head trained with its classes in another order gets ``--classes`` instead: the names in the
head's output order, which must be exactly the data's names (no name missing, none extra, none twice); the data's
labels are then mapped to the head's outputs in that order.
"""

from __future__ import annotations

from tunelens.compare.plan import CompareError

__all__ = ["check_class_names", "parse_classes"]


def parse_classes(spec: str | None) -> list[str] | None:
    """The names of ``--classes`` (comma-separated, surrounding spaces removed); None when not given.
    CompareError on an empty name or a name given twice."""
    if spec is None:
        return None
    names = [n.strip() for n in spec.split(",")]
    if not names or any(not n for n in names):
        raise CompareError(
            f"--classes {spec!r}: give the class names in the head's output order, e.g. --classes cat,dog"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CompareError(f"--classes names {', '.join(map(repr, twice))} more than once; each class once")
    return names


def check_class_names(order: list[str], data_classes: list[str], data: str) -> None:
    """``order`` (from ``--classes``) must be exactly the data's class names; CompareError naming the difference."""
    missing = [c for c in data_classes if c not in order]
    extra = [c for c in order if c not in data_classes]
    if missing or extra:
        parts = []
        if extra:
            parts.append(f"--classes names {', '.join(map(repr, extra[:8]))} that --data {data} does not have")
        if missing:
            parts.append(f"--data has {', '.join(map(repr, missing[:8]))} that --classes does not name")
        raise CompareError(
            "; ".join(parts)
            + f" (the data's classes: {', '.join(data_classes[:12])}"
            + (" ..." if len(data_classes) > 12 else "")
            + "); --classes lists every class of the data once, in the head's output order"
        )
