"""Class order: does a classifier that scores below chance read its classes in another order than the data?

A head trained on classes listed in one order, evaluated on data that lists them in another, predicts the right
class under the wrong index: its confusion matrix is close to a permutation matrix and its accuracy is below
chance. :func:`detect_class_order` finds the permutation that matches the most test examples (an assignment
problem on the confusion matrix, :func:`scipy.optimize.linear_sum_assignment` maximising the matched counts) and
flags the pair when that permutation explains the predictions far better than the data's own order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ClassOrder", "confusion_matrix", "detect_class_order"]

#: the significance level of both tests (strict: the permutation is chosen on the same matrix it is tested on)
ALPHA = 1e-3

#: the permuted order must match at least this many times as many examples as the data's order
MIN_RATIO = 2.0


@dataclass(frozen=True)
class ClassOrder:
    """The result of :func:`detect_class_order`.

    ``perm[i]``: the head output that the data's class ``i`` is matched to; ``accuracy``: the accuracy with the
    data's order (the identity); ``permuted_accuracy``: with ``perm``; ``chance``: the accuracy of always guessing
    the most frequent class; ``p_value``: the larger of the two tests' p-values; ``flagged``: the rule holds."""

    perm: tuple[int, ...]
    accuracy: float
    permuted_accuracy: float
    chance: float
    n: int
    p_value: float
    flagged: bool

    def head_order(self, classes: list[str]) -> list[str]:
        """The data's class names in the head's output order under ``perm`` (what ``--classes`` takes)."""
        out = [""] * len(self.perm)
        for i, j in enumerate(self.perm):
            out[j] = classes[i]
        return out

    def moved(self) -> list[tuple[int, int]]:
        """``(data class, head output)`` for each class that ``perm`` moves."""
        return [(i, j) for i, j in enumerate(self.perm) if i != j]


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """``cm[i, j]``: how many examples of the data's class ``i`` the model predicts as output ``j`` (``k`` x ``k``)."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, int), np.asarray(preds, int)), 1)
    return cm


def detect_class_order(cm: np.ndarray) -> ClassOrder:
    """The best permutation of the confusion matrix ``cm`` (rows: the data's classes, columns: the head's outputs)
    and whether it flags a class-order mismatch.

    Rule: with ``n`` examples, identity accuracy ``a = trace / n``, chance ``c`` = the largest class's share, and
    ``perm`` the assignment maximising the matched counts (accuracy ``b``), the pair is flagged when all hold:
    ``a < c`` (below chance); ``b > c`` and ``b >= MIN_RATIO * a``; a one-sided binomial test of ``b * n`` matches
    against chance ``c`` has p < :data:`ALPHA`; and a one-sided sign test on the examples the two orders disagree
    on (correct under ``perm`` only vs under the identity only, as in McNemar's test) has p < :data:`ALPHA`."""
    from scipy.optimize import linear_sum_assignment
    from scipy.stats import binomtest

    cm = np.asarray(cm, dtype=np.int64)
    k, n = cm.shape[0], int(cm.sum())
    ident = tuple(range(k))
    if n == 0 or k < 2 or cm.shape != (k, k):
        return ClassOrder(ident, float("nan"), float("nan"), float("nan"), n, 1.0, False)
    rows, cols = linear_sum_assignment(cm, maximize=True)
    perm = [0] * k
    for i, j in zip(rows, cols, strict=True):
        perm[int(i)] = int(j)
    a = float(np.trace(cm)) / n
    matched = int(cm[rows, cols].sum())
    b = matched / n
    c = float(cm.sum(1).max()) / n
    if tuple(perm) == ident or matched <= np.trace(cm):
        return ClassOrder(ident, a, a, c, n, 1.0, False)
    p_chance = binomtest(matched, n, min(c, 1.0), alternative="greater").pvalue
    only_perm = int(sum(cm[i, perm[i]] for i in range(k)))  # correct under perm; minus those correct under both
    both = int(sum(cm[i, i] for i in range(k) if perm[i] == i))
    gain, loss = only_perm - both, int(np.trace(cm)) - both
    p_sign = binomtest(gain, gain + loss, 0.5, alternative="greater").pvalue if gain + loss else 1.0
    p = float(max(p_chance, p_sign))
    flagged = a < c and b > c and b >= MIN_RATIO * a and p < ALPHA
    return ClassOrder(tuple(perm), a, b, c, n, p, bool(flagged))
