"""Every table a report section reads is declared by a step (``Analysis.tables`` of a module under
``analysis/steps/``): a section never reads a table that no analysis writes.

The tables a section reads are the string literals it passes to ``res.table(...)``, ``res.tables[...]`` or
``res.tables.get(...)``, and, for ``res.table(name)`` inside ``for name ... in (...)``, the literals of that loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tunelens.analysis  # noqa: F401 - the steps register themselves
from tunelens.analysis.engine.registry import registered

SECTIONS = Path(__file__).resolve().parents[1] / "reports" / "sections"


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def tables_read(source: str) -> set[str]:
    """The table names a section's source reads (see the module docstring)."""
    tree = ast.parse(source)
    loops: dict[str, set[str]] = {}  # loop variable -> the literals it takes
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.comprehension)):
            targets = node.target.elts if isinstance(node.target, ast.Tuple) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            lits = set()
            if isinstance(node.iter, (ast.Tuple, ast.List)):
                for item in node.iter.elts:
                    first = item.elts[0] if isinstance(item, ast.Tuple) and item.elts else item
                    if _literal(first) is not None:
                        lits.add(str(_literal(first)))
            for n in names[:1]:
                loops.setdefault(n, set()).update(lits)
    out: set[str] = set()
    for node in ast.walk(tree):
        arg = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            f = node.func
            if f.attr == "table" or (
                f.attr == "get" and isinstance(f.value, ast.Attribute) and f.value.attr == "tables"
            ):
                arg = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "tables":
            arg = node.slice
        if arg is None:
            continue
        if _literal(arg) is not None:
            out.add(str(_literal(arg)))
        elif isinstance(arg, ast.Name):
            out |= loops.get(arg.id, set())
    return out


def declared() -> set[str]:
    """Tables some producer declares: the registered steps, and the streaming weight audit (``tunelens weights``,
    which runs outside the registry)."""
    from tunelens.analysis.engine.audit_tables import AUDIT_TABLES

    return {t for a in registered() for t in a.tables} | set(AUDIT_TABLES)


def test_every_table_a_section_reads_is_declared_by_a_step():
    missing = {
        (path.name, t) for path in sorted(SECTIONS.glob("*.py")) for t in tables_read(path.read_text()) - declared()
    }
    assert missing == set()


def test_sections_read_tables():
    """The reader finds what the sections read (a checker that finds nothing would pass anything)."""
    read = set().union(*(tables_read(p.read_text()) for p in SECTIONS.glob("*.py")))
    assert {"accuracy", "cka_chance", "cka_base_base", "attribution_summary", "weight_deltas", "intruders"} <= read


def test_checker_catches_an_undeclared_table():
    src = (
        "def build(res):\n"
        "    a = res.table('weight_deltas')\n"
        "    b = res.tables['no_such_table']\n"
        "    for key, title in (('cka_base_base', 'x'), ('nor_this_one', 'y')):\n"
        "        res.table(key)\n"
    )
    assert tables_read(src) - declared() == {"no_such_table", "nor_this_one"}
