"""Every family analysed end to end at small size with random weights: the stages found, the CKA layers, the
Grad-CAM layer (or why it does not apply), and findings without nan/inf. Plus the stage finder on its own
(fast): ResNet names, a ModuleList factory, timm's feature_info (a fake), layer views."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tunelens.analysis.engine.registry import analysis_defaults
from tunelens.analysis.suite import analyze_models
from tunelens.core.architectures import TinyResNet
from tunelens.core.hooks import ActivationCapture
from tunelens.core.stages import stages
from tunelens.finetune.strategies import trainable_prefixes

sys.path.insert(0, str(Path(__file__).parent))
from _families import FAMILIES, ListNet, toy_data, tuned_copy

#: family -> (stage names, Grad-CAM layer or None)
EXPECTED = {
    "resnet": (["stem", "layer1", "layer2", "layer3", "layer4", "head"], "layer3"),  # layer4 is 1x1 at 32 px
    "resnext": (["stem", "layer1", "layer2", "layer3", "layer4", "head"], "layer3"),
    "swin": (["stem", "features.1", "features.2-3", "head"], "permute"),
    # class-token readout: the last block's input (= encoder_layer_0's output) as a patch grid
    "vit": (
        ["stem", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "head"],
        "encoder.layers.encoder_layer_0[grid]",
    ),
    "modulelist": (["stem", "_blocks.0", "_blocks.1-2", "_blocks.3-4", "head"], "_bn1"),
    "squeezenet": (["stem", "features.3-4", "features.5-7", "features.8-12", "head"], "features.12"),
}


def test_tiny_resnet_keeps_its_stage_names():
    smap = stages(TinyResNet(num_classes=3), torch.zeros(1, 3, 32, 32))
    assert smap.names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert smap.cka_layers() == ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert smap.gradcam_layer == "layer4"
    assert smap.stage_of("conv1.weight") == smap.stage_of("bn1.bias") == "stem"
    assert smap.stage_of("layer3.0.conv1.weight") == "layer3" and smap.stage_of("fc.bias") == "head"


def test_last_k_counts_the_stem_as_one_stage():
    m = TinyResNet(num_classes=3)
    assert trainable_prefixes(m, "last_k", 1) == ["layer4", "fc"]
    assert trainable_prefixes(m, "last_k", 5)[:4] == ["conv1", "bn1", "relu", "maxpool"]
    with pytest.raises(ValueError, match="1 <= k <= 5"):
        trainable_prefixes(m, "last_k", 6)


def test_modulelist_blocks_are_stages_and_pooling_is_never_the_gradcam_layer():
    smap = stages(ListNet(3), torch.zeros(1, 3, 32, 32))
    assert len(smap.body) == 3  # one stage per resolution, not one for the whole ModuleList
    assert smap.gradcam_layer != "_avg_pooling"
    assert "_avg_pooling" in smap.stage("head").modules


def test_plain_modulelist_without_downsampling_splits_by_blocks():
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 16)
            self.layers = nn.ModuleList(
                [nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(3)]
            )
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            h = self.embed(x.flatten(2).transpose(1, 2))
            for layer in self.layers:
                h = h + layer(h)
            return self.fc(h.mean(1))

    smap = stages(Enc(), torch.zeros(1, 3, 4, 4))
    assert smap.method == "repeated blocks of layers"
    assert smap.names == ["stem", "layers.0", "layers.1", "layers.2", "head"]
    assert "layers.1[mean]" in smap.cka_layers()


def test_timm_feature_info_gives_the_stage_ends():
    m = ListNet(3)
    m.feature_info = [{"module": "_bn0", "reduction": 1}, {"module": "_blocks.2"}, {"module": "_blocks.4"}]
    smap = stages(m, torch.zeros(1, 3, 32, 32))
    assert smap.method == "timm feature_info"
    assert [s.modules[-1] for s in smap.body] == ["_blocks.2", "_bn1"]


def test_views_capture_tokens_and_channels_last():
    class Tok(nn.Module):
        def forward(self, x):
            return x

    m = nn.Sequential(Tok())
    x = torch.arange(24.0).reshape(1, 3, 8)
    with ActivationCapture(m, ["0[nhwc]"]) as cap:
        m(x[..., None])  # (1, 3, 8, 1): channels-last view permutes
    assert cap.features["0[nhwc]"].shape == (1, 1, 3, 8)
    with ActivationCapture(m, ["0[cls]", "0[patch_mean]"]) as cap:
        m(x)
    assert torch.equal(cap.features["0[cls]"], x[:, 0])
    assert torch.allclose(cap.features["0[patch_mean]"], x[:, 1:].mean(1))


def settings() -> dict:
    s = analysis_defaults()
    s.update(attribution_images=2, attribution_methods="saliency,grad_cam", interpolation_steps=2, batch_size=8)
    return s


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "squeezenet"])
def test_family_end_to_end(family):
    build, side = FAMILIES[family]
    torch.manual_seed(0)
    base = build(5)
    data = {"train": toy_data(16, side), "test": toy_data(8, side, seed=1)}
    res = analyze_models(
        {"base": base, "full": tuned_copy(base, 3)},
        {"base": {"role": "base"}, "full": {"role": "tuned", "strategy": "full"}},
        data,
        settings(),
        device=torch.device("cpu"),
        progress=False,
        log=lambda _m: None,
        random_like=lambda seed: (torch.manual_seed(seed), build(5))[1],
    )
    s = res.summary
    assert s["failed"] == {}, s["failed"]
    st = s["stages"]
    names = [g["name"] for g in st["stages"]]
    assert names[-1] == "head" and len([g for g in st["stages"] if g["kind"] == "body"]) >= 2, names
    if family in EXPECTED:
        assert names == EXPECTED[family][0]
        assert st["gradcam_layer"] == EXPECTED[family][1]
    if st["gradcam_layer"] is None:
        assert "grad_cam" in s["skipped"] and "not applicable" in s["skipped"]["grad_cam"]
    cka = res.table("cka_chance")
    assert list(cka["layer"]) == [k for k, v in st["layers"].items() if v != "logits"]
    if family == "vit":
        assert any(n.endswith("[cls]") for n in cka["layer"]) and any(n.endswith("[patch_mean]") for n in cka["layer"])
    if family == "swin":
        assert any(n.endswith("[nhwc]") for n in cka["layer"])
    assert set(res.table("weight_stages")["stage"]) <= set(names) | {"unused"}
    for f in s["findings"]:
        for t in (f["text"], f["uncertainty"] or ""):
            assert not re.search(r"(?<![A-Za-z])(nan|inf)(?![A-Za-z])", t, re.I), t
    assert s["findings"][0]["id"] == "small_data"


class _Tokens(nn.Module):
    """A toy token classifier: 4x4 patches of 1 pixel with a class token; block 1 mixes nothing, block 2 lets the
    class token read patch ``HOT`` only; the head reads the class token."""

    HOT = 5  # grid cell (1, 1) of the 4x4 grid

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 3))
        self.blocks = nn.ModuleList([nn.Identity(), nn.Identity()])
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.cat([self.cls_token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)  # (B, 17, 3)
        t = self.blocks[0](t)
        t = self.blocks[1](t)
        return self.head(t[:, 0] + t[:, 1 + self.HOT])


def test_token_grad_cam_is_grad_cam_on_the_patch_grid():
    from tunelens.analysis.measures.attribution.gradcam import token_grad_cam

    m = _Tokens().eval()
    x = torch.randn(2, 3, 4, 4)
    cam = token_grad_cam(m, "blocks.0", x, torch.tensor([0, 1]))
    assert cam.shape == (2, 1, 4, 4)
    # by hand: only patch HOT gets a gradient, the head row of the target; the channel weight is its mean over
    # the 16 patches, so cam[p] = a[p] . w_target / 16 for every patch p
    for i, t in enumerate([0, 1]):
        w = m.head.weight[t] / 16
        want = (x[i].flatten(1).T @ w).reshape(4, 4)
        torch.testing.assert_close(cam[i, 0], want.detach())


def test_token_grad_cam_runs_through_attribute():
    from tunelens.analysis.measures.attribution.attribute import attribute

    m = _Tokens().eval()
    x = torch.randn(2, 3, 4, 4)
    maps = attribute(m, x, target=torch.tensor([0, 1]), method="grad_cam", layer="blocks.0[grid]")
    assert maps.shape == x.shape and torch.isfinite(maps).all() and maps.abs().sum() > 0
