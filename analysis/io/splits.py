"""Deterministic train/test splits of a dataset, stratified by class."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Subset

__all__ = ["split_train_test"]


class _Split(Subset):
    """A Subset that keeps the parent's ``classes`` (attribution reports name classes)."""

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.dataset, "classes", []))

    @property
    def targets(self) -> list[int]:
        t = getattr(self.dataset, "targets", None)
        if t is None:
            raise AttributeError(f"{type(self.dataset).__name__} has no targets")
        return [t[i] for i in self.indices]


def split_train_test(dataset: Any, test_fraction: float = 0.5, seed: int = 0) -> tuple[Subset, Subset]:
    """A deterministic split stratified by class: ``(train, test)`` subsets keeping ``classes``.

    Each class with at least two images puts at least one in each part; a class with one
    image goes to the test part. Subsets are in the dataset's order.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    targets = list(getattr(dataset, "targets", None) or [int(dataset[i][1]) for i in range(len(dataset))])
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in sorted(set(targets)):
        idx = [i for i, t in enumerate(targets) if t == c]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        if len(idx) == 1:
            test += idx
            continue
        n_test = min(max(1, int(round(len(idx) * float(test_fraction)))), len(idx) - 1)
        test += idx[:n_test]
        train += idx[n_test:]
    return _Split(dataset, sorted(train)), _Split(dataset, sorted(test))
