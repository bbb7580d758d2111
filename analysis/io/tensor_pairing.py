"""Pairing the tensors of two checkpoints by name, across the prefixes wrappers add.

Names are paired first as they are; the rest by their *canonical* name, the name without leading wrapper
prefixes (:data:`PREFIXES`: PEFT's ``base_model.model.``, DDP's ``module.``, ``torch.compile``'s ``_orig_mod.``,
and Hugging Face's ``model.``, which a task model has and its bare backbone has not), when that canonical name
is unique on both sides. Pairs whose names differ are *renamed*; base tensors left over are *missing* from the
tuned checkpoint, tuned ones left over are *extra*.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["PREFIXES", "Pairing", "canonical_name", "pair_names"]

PREFIXES = ("base_model.model.", "module.", "_orig_mod.", "model.")


def canonical_name(name: str) -> str:
    """``name`` without any leading :data:`PREFIXES` (removed repeatedly, in any order)."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p) and len(name) > len(p):
                name, changed = name[len(p) :], True
    return name


@dataclass
class Pairing:
    """``pairs``: ``(base name, tuned name)`` in base order; ``renamed``: the pairs whose names differ;
    ``missing``: base tensors without a partner; ``extra``: tuned tensors without one."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def renamed(self) -> list[tuple[str, str]]:
        return [(a, b) for a, b in self.pairs if a != b]


def pair_names(base: Iterable[str], tuned: Iterable[str]) -> Pairing:
    """Pair two lists of tensor names (see the module docstring)."""
    base, tuned = list(base), list(tuned)
    tuned_set = set(tuned)
    exact = {n for n in base if n in tuned_set}
    rest_a = [n for n in base if n not in exact]
    rest_b = [n for n in tuned if n not in exact]
    ca, cb = Counter(map(canonical_name, rest_a)), Counter(map(canonical_name, rest_b))
    by_canon = {canonical_name(n): n for n in rest_b if cb[canonical_name(n)] == 1}
    out = Pairing()
    used: set[str] = set()
    for n in base:
        if n in exact:
            out.pairs.append((n, n))
            continue
        c = canonical_name(n)
        if ca[c] == 1 and c in by_canon:
            out.pairs.append((n, by_canon[c]))
            used.add(by_canon[c])
        else:
            out.missing.append(n)
    out.extra = [n for n in rest_b if n not in used]
    return out
