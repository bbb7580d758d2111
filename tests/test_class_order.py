"""Class order: a pair whose data lists the classes in another order than the head is detected, said first with
the mapping by name, and ``compare --classes`` (the head's order) gives the right accuracies."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tunelens.analysis.measures.class_order import confusion_matrix, detect_class_order
from tunelens.analysis.steps.evaluation import CLASS_ORDER_SCORE, class_order_findings


def test_a_permutation_is_flagged_with_its_mapping():
    cm = np.array([[1, 18, 1, 0], [0, 1, 0, 19], [19, 0, 1, 0], [1, 0, 18, 1]])  # 0->1, 1->3, 2->0, 3->2
    o = detect_class_order(cm)
    assert o.flagged and o.perm == (1, 3, 0, 2)
    assert o.accuracy == 4 / 80 and o.permuted_accuracy == 74 / 80
    assert o.head_order(["a", "b", "c", "d"]) == ["c", "a", "d", "b"]


def test_a_swap_of_two_classes_is_flagged():
    cm = np.array([[2, 18, 0], [17, 3, 0], [1, 1, 3]])  # classes 0 and 1 swapped; class 2 weak but in place
    o = detect_class_order(cm)
    assert o.flagged and o.perm == (1, 0, 2) and o.moved() == [(0, 1), (1, 0)]


def test_near_identity_and_uniform_are_not_flagged():
    near = np.array([[18, 1, 1], [2, 17, 1], [0, 3, 17]])
    assert not detect_class_order(near).flagged and detect_class_order(near).perm == (0, 1, 2)
    uniform = np.full((4, 4), 5)
    assert not detect_class_order(uniform).flagged
    rng = np.random.default_rng(0)  # random predictions: below chance sometimes, never a clear permutation
    for _ in range(20):
        y, p = rng.integers(0, 3, 30), rng.integers(0, 3, 30)
        assert not detect_class_order(confusion_matrix(y, p, 3)).flagged
    few = np.array([[0, 2], [2, 0]])  # a perfect swap on 4 examples: too few to say
    assert not detect_class_order(few).flagged


def test_the_finding_names_the_mapping_and_the_fix():
    labels = np.repeat([0, 1, 2], 20)
    preds = np.array([1, 2, 0])[labels]  # cat -> output 1 (dog), dog -> output 2 (fish), fish -> output 0 (cat)
    preds[:2] = 0
    df = pd.DataFrame({"model": "tuned", "index": range(60), "label": labels, "pred": preds})
    df["correct"] = (df["label"] == df["pred"]).astype(int)
    (f,) = class_order_findings(df, ["cat", "dog", "fish"])
    assert f.score == CLASS_ORDER_SCORE and f.id == "class_order_tuned"
    assert "the data's class 'cat' looks like the head's output 1 ('dog')" in f.text
    assert "--classes fish,cat,dog (the head's output order)" in f.text
    assert "3.3%" in f.text and "96.7%" in f.text
    df["pred"] = df["label"]
    assert class_order_findings(df, ["cat", "dog", "fish"]) == []
