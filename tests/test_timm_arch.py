"""``--arch timm:NAME``: any timm classifier in the catalogue, its head found and replaced, its stages named;
``tunelens compare --arch timm:...`` end to end; a clear one-line error without timm."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from tunelens.cli import main
from tunelens.core.architectures import build_model, replace_head
from tunelens.core.naming import head_name, stage_of, stage_order

timm = pytest.importorskip("timm")


@pytest.mark.parametrize(
    "arch,head,stages",
    [
        ("timm:resnet10t", "fc", ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
        ("timm:mobilenetv3_small_050", "classifier", ["stem", "blocks.0", "blocks.5", "conv_head", "head"]),
        ("timm:tf_efficientnet_lite0", "classifier", ["stem", "blocks.0", "blocks.6", "conv_head", "head"]),
    ],
)
def test_build_head_and_stages(arch, head, stages):
    model = build_model(arch, 5, seed=0)
    assert head_name(model) == head
    assert model.get_submodule(head).out_features == 5
    replace_head(model, 3, seed=1)
    assert head_name(model) == head and model.get_submodule(head).out_features == 3
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    order = stage_order(model)
    assert all(s in order for s in stages), order
    assert order[0] == "stem" and order[-1] == "head"


def test_timm_head_names_beyond_fc_and_classifier():
    assert head_name(build_model("timm:convnext_atto", 4)) == "head.fc"
    assert stage_of("head.fc.weight") == "head" and stage_of("stages.2.blocks.0.conv_dw.weight") == "stages.2"


def test_unknown_timm_model_suggests_names():
    with pytest.raises(ValueError, match="timm:resnet18"):
        build_model("timm:resnt18", 3)


def test_without_timm_one_clear_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ValueError, match="pip install timm"):
        build_model("timm:resnet10t", 3)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "timm" else object())
    rc = main(["run", "--quick", "--set", "arch=timm:resnet10t", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install timm" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compare_with_a_timm_arch(tmp_path, capsys):
    """A timm resnet10t base (random weights, 10 classes) and a tuned copy (3-class head, a few SGD steps)."""
    from test_compare_cli import FAST, make_images

    data = make_images(tmp_path / "data")
    base = build_model("timm:resnet10t", 10, seed=0)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    tuned = copy.deepcopy(base)
    replace_head(tuned, 3, seed=1)
    opt = torch.optim.SGD(tuned.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    tuned.train()
    for _ in range(2):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tuned(x), y).backward()
        opt.step()
    torch.save(tuned.state_dict(), tmp_path / "tuned.pt")
    out = tmp_path / "cmp"
    argv = ["compare", "--arch", "timm:resnet10t", "--base", str(tmp_path / "base.pt")]
    argv += ["--tuned", str(tmp_path / "tuned.pt"), "--data", str(data), "--out", str(out)]
    rc = main(argv + FAST)
    assert rc in (0, 1), capsys.readouterr().err  # 1: an analysis step failed (listed in the report)
    assert (out / "report" / "index.html").exists()
    import json

    summary = json.loads((out / "results" / "summary.json").read_text())
    assert summary.get("failed", {}) == {}, summary.get("failed")
    assert "timm:resnet10t" in (out / "report" / "index.html").read_text()
