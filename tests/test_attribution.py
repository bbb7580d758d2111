"""Attribution maps: exactness on a linear model, preparation, every method on two ResNets, seeds, batching."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from tunelens.analysis.measures.attribution.attribute import (
    CoarseLayerWarning,
    attribute,
    attribute_group,
    attribute_pair,
)
from tunelens.analysis.measures.attribution.methods import DEFAULT_METHODS
from tunelens.analysis.measures.attribution.prepare import (
    LogitMismatchError,
    SplitReLUBasicBlock,
    SplitReLUBottleneck,
    cascade_stages,
    is_prepared,
    prepare_for_attribution,
    randomize_cascading,
    reused_modules,
)
from tunelens.analysis.measures.attribution.probe_head import fit_probe_head, head_features
from tunelens.analysis.measures.attribution.targets import resolve_targets
from tunelens.finetune.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


FAST = {
    "integrated_gradients": {"n_steps": 4},
    "smoothgrad": {"nt_samples": 2},
    "gradient_shap": {"n_samples": 2},
    "occlusion": {"window": 8, "stride": 8},
}


class LinearNet(nn.Module):
    def __init__(self, c: int = 3, h: int = 6, classes: int = 4):
        super().__init__()
        self.fc = nn.Linear(c * h * h, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    model = LinearNet().eval()
    x = torch.randn(5, 3, 6, 6)
    target = torch.tensor([0, 1, 2, 3, 1])
    return model, x, target


def test_ig_on_linear_model_is_x_times_w(linear):
    model, x, target = linear
    a = attribute(model, x, target, "integrated_gradients")
    w = model.fc.weight.detach()[target].view_as(x)
    torch.testing.assert_close(a, x * w, atol=1e-5, rtol=0)
    # a single int target works too
    a0 = attribute(model, x, 0, "integrated_gradients", n_steps=8)
    torch.testing.assert_close(a0, x * model.fc.weight.detach()[0].view(1, 3, 6, 6), atol=1e-5, rtol=0)


def test_saliency_on_linear_model_is_abs_w(linear):
    model, x, target = linear
    a = attribute(model, x, target, "saliency")
    w = model.fc.weight.detach()[target].view_as(x)
    torch.testing.assert_close(a, w.abs(), atol=1e-5, rtol=0)
    # input x gradient: x * w exactly as well
    torch.testing.assert_close(attribute(model, x, target, "input_x_gradient"), x * w, atol=1e-5, rtol=0)


def test_prepare_makes_a_checked_copy():
    model = build_model("resnet18", 5, seed=0)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    p = prepare_for_attribution(model, x)
    assert is_prepared(p) and p is not model
    assert not any(m.training for m in p.modules())
    assert not any(getattr(m, "inplace", False) for m in p.modules())
    assert all(isinstance(m, SplitReLUBasicBlock) for m in p.modules() if isinstance(m, BasicBlock))
    assert reused_modules(p, x) == {}
    assert len(reused_modules(model, x)) == 8  # every BasicBlock's relu runs twice in the original
    # the original is untouched: its mode, module types and in-place ReLUs
    assert model.training and type(model.layer1[0]) is BasicBlock and model.relu.inplace
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(p(x), model(x), rtol=1e-6, atol=1e-6)
    # same parameters, same names
    assert p.state_dict().keys() == model.state_dict().keys()
    assert prepare_for_attribution(p, x) is p


def test_prepare_bottleneck():
    from torchvision.models import resnet50

    model = resnet50(num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    p = prepare_for_attribution(model, x)
    assert isinstance(p.layer1[0], SplitReLUBottleneck) and reused_modules(p, x) == {}
    with torch.no_grad():
        torch.testing.assert_close(p(x), model(x), rtol=1e-5, atol=1e-5)


class _Sneaky(nn.Module):
    """A module whose output depends on its ``inplace`` flag: preparation changes its function."""

    def __init__(self):
        super().__init__()
        self.inplace = True
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out * 2 if self.inplace else out


def test_prepare_refuses_changed_logits_and_softmax():
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(LogitMismatchError):
        prepare_for_attribution(_Sneaky(), x)
    soft = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Softmax(dim=1))
    with pytest.raises(ValueError, match="logits"):
        attribute(soft, x, 0, "saliency")


def test_lrp_refused_for_residual_networks():
    model = build_model("tiny_resnet", 3, seed=0)
    with pytest.raises(ValueError, match="residual"):
        attribute(model, torch.randn(2, 3, 32, 32), 0, "lrp")


def test_unknown_method_and_missing_target(linear):
    model, x, target = linear
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribute(model, x, target, "lime-ish")
    with pytest.raises(ValueError, match="target"):
        attribute(model, x, None, "saliency")


@pytest.mark.parametrize("arch", ["tiny_resnet", "resnet18"])
def test_every_method_runs(arch):
    model = build_model(arch, 6, seed=0).eval()
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 3, 5])
    with torch.no_grad():
        ref = model(x)
    for method in DEFAULT_METHODS + ("deeplift",):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = attribute(model, x, y, method, **FAST.get(method, {}))
        assert a.shape == x.shape, method
        assert torch.isfinite(a).all() and a.abs().sum() > 0, method
        coarse = [w for w in caught if issubclass(w.category, CoarseLayerWarning)]
        if method == "grad_cam":
            # tiny_resnet's layer4 is 4x4 at 32x32 inputs; resnet18's is 1x1
            assert bool(coarse) == (arch == "resnet18")
        else:
            assert not coarse
    with torch.no_grad():  # the model itself was not changed by any of it
        torch.testing.assert_close(model(x), ref)


def test_grad_cam_is_captum_layer_gradcam_upsampled():
    from captum.attr import LayerAttribution, LayerGradCam

    model = build_model("tiny_resnet", 4, seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    a = attribute(model, x, 1, "grad_cam", layer="layer3")
    p = prepare_for_attribution(model, x)
    cam = LayerGradCam(p, p.layer3).attribute(x, target=1)
    up = LayerAttribution.interpolate(cam, (32, 32), interpolate_mode="bilinear")
    torch.testing.assert_close(a.sum(1, keepdim=True), up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap"])
def test_same_seed_same_maps(method):
    model = build_model("tiny_resnet", 4, seed=0).eval()
    x = torch.randn(4, 3, 32, 32)
    opts = dict(FAST[method])
    if method == "gradient_shap":  # a fresh ReLU net with zero biases has the same gradient all along a ray
        opts["baselines"] = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = attribute(model, x, 1, method, seed=7, **opts)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is untouched
    b = attribute(model, x, 1, method, seed=7, **opts)
    c = attribute(model, x, 1, method, seed=8, **opts)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pair_shares_noise_and_targets():
    model = build_model("tiny_resnet", 4, seed=0).eval()
    other = build_model("tiny_resnet", 4, seed=1).eval()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    pm = attribute_pair(
        model,
        model,
        x,
        y,
        methods=("smoothgrad", "gradient_shap"),
        options={k: FAST[k] for k in ("smoothgrad", "gradient_shap")},
        seed=3,
    )
    for m in pm:
        a, b = pm[m]
        assert torch.equal(a, b), m  # same model, same draws -> the same map
    pred = attribute_pair(model, other, x, "pred", methods=("saliency",))
    assert torch.equal(pred.target_base, resolve_targets(prepare_for_attribution(model, x), x, "pred"))
    assert pred["saliency"][0].shape == x.shape
    with pytest.raises(ValueError, match="probe head"):
        attribute_pair(build_model("tiny_resnet", 8, seed=0), model, x, y, methods=("saliency",))


def test_batching_does_not_change_deterministic_maps():
    model = build_model("tiny_resnet", 4, seed=0).eval()
    x = torch.randn(5, 3, 32, 32)
    for method, opts in (("integrated_gradients", {"n_steps": 6}), ("occlusion", {"window": 8, "stride": 8})):
        big = attribute(model, x, 2, method, eval_batch=64, **opts)
        small = attribute(model, x, 2, method, eval_batch=2, **opts)
        torch.testing.assert_close(big, small, rtol=1e-4, atol=1e-6)


class _SmallMemory(nn.Module):
    """Fails like an out-of-memory GPU on batches larger than ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        if len(x) > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.fc(x.flatten(1))


def test_out_of_memory_splits_the_batch():
    model = _SmallMemory(limit=10**6).eval()
    x = torch.randn(6, 3, 2, 2)
    want = attribute(model, x, 1, "integrated_gradients", n_steps=8, eval_batch=4)
    prepared = prepare_for_attribution(model, x)
    prepared.limit = 5
    with pytest.warns(UserWarning, match="out of memory"):
        got = attribute_group(
            [prepared], x, [torch.ones(6, dtype=torch.long)], "integrated_gradients", n_steps=8, eval_batch=64
        )[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_randomize_cascading_top_down():
    model = build_model("tiny_resnet", 4, seed=0)
    assert cascade_stages(model)[:3] == ["fc", "layer4", "layer3"]
    r2 = randomize_cascading(model, n_stages=2, seed=0)
    sd, rd = model.state_dict(), r2.state_dict()
    changed = {k.split(".")[0] for k in sd if not torch.equal(sd[k], rd[k])}
    assert changed == {"fc", "layer4"}
    full_a, full_b = randomize_cascading(model, seed=5), randomize_cascading(model, seed=5)
    assert all(torch.equal(full_a.state_dict()[k], full_b.state_dict()[k]) for k in sd)
    assert not torch.equal(full_a.conv1.weight, model.conv1.weight)
    with pytest.raises(ValueError):
        randomize_cascading(model, n_stages=99)


def test_probe_head_answers_the_target_task():
    torch.manual_seed(0)
    model = build_model("tiny_resnet", 8, seed=0).eval()
    x = torch.randn(60, 3, 32, 32)
    y = torch.arange(60) % 3
    x[y == 1, 0] += 2.0  # separable in colour
    x[y == 2, 1] += 2.0
    probe, info = fit_probe_head(model, (x, y), num_classes=3)
    assert probe.fc.out_features == 3 and model.fc.out_features == 8
    feats, _ = head_features(model, (x, y))
    with torch.no_grad():
        got = probe(x)
    want = torch.from_numpy(feats).float() @ probe.fc.weight.T + probe.fc.bias
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert info["train_acc"] > 0.9
    assert attribute(probe, x[:2], 1, "saliency").shape == (2, 3, 32, 32)


def _coarse_warning(model, x) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attribute(model, x, torch.zeros(len(x), dtype=torch.long), "grad_cam")
    coarse = [str(w.message) for w in caught if issubclass(w.category, CoarseLayerWarning)]
    assert len(coarse) == 1, coarse
    return coarse[0]


@pytest.mark.parametrize(
    ("arch", "size", "suggested"),
    [("timm:tf_efficientnet_lite0", 96, "blocks.4"), ("tiny_resnet", 16, "layer3")],
)
def test_coarse_grad_cam_warning_names_layers_of_the_model_at_hand(arch, size, suggested):
    """The coarse-layer hint names layers of the model it warns about (issue 24: EfficientNet-Lite0 was told
    "e.g. layer3", a layer it does not have): every quoted name is a module of that model."""
    import re

    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    model = build_model(arch, 4, seed=0).eval()
    msg = _coarse_warning(model, torch.randn(2, 3, size, size))
    names = re.findall(r"'([^']+)'", msg)
    modules = dict(model.named_modules())
    assert names and all(n in modules for n in names), (names, msg)
    assert f"e.g. {suggested!r}" in msg, msg
    assert "layer3" not in msg or arch == "tiny_resnet", msg


def test_coarse_grad_cam_warning_without_a_finer_layer_asks_for_larger_inputs():
    model = build_model("tiny_resnet", 4, seed=0).eval()
    msg = _coarse_warning(model, torch.randn(2, 3, 8, 8))  # layer1 8x8 ... layer4 1x1: layer2 is 4x4
    assert "e.g. 'layer2'" in msg, msg


def test_available_ram_counts_the_page_cache(monkeypatch, tmp_path):
    """auto_eval_batch sizes attribution passes by MemAvailable (free memory plus reclaimable page cache), not
    by free memory alone, which any earlier file read shrinks (resnet50 at 224 px ran 1 to 3 images a pass)."""
    import builtins
    import importlib

    A = importlib.import_module("tunelens.analysis.measures.attribution.batching")

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:          100000 kB\nMemAvailable:   20000000 kB\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(meminfo if f == "/proc/meminfo" else f, *a, **k))
    assert A._available_ram() == 20000000 * 1024


def test_auto_threads_ignores_this_process_load(monkeypatch):
    """The study gives up a thread only for other processes' load: a run computing on 2 threads keeps the
    1-minute load of a 2-core machine near 2 by itself."""
    import importlib
    import os

    S = importlib.import_module("tunelens.analysis.measures.attribution.study")  # the module, not the function

    assert 0.0 <= S._own_load() <= torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.3, 2.0, 1.5))
    monkeypatch.setattr(S, "_own_load", lambda: 1.9)  # all of it this process's own
    assert S._auto_threads("auto") is None
    monkeypatch.setattr(os, "getloadavg", lambda: (4.5, 4.0, 3.0))  # two more cores' worth from others
    assert S._auto_threads("auto") == 1
    assert S._auto_threads(3) == 3 and S._auto_threads(None) is None


@pytest.mark.parametrize("method", ["smoothgrad", "gradient_shap"])
def test_stochastic_maps_do_not_depend_on_the_batch_size(method):
    """SmoothGrad's noise and GradientSHAP's draws follow the seed and each image's position, not the batch the
    memory allows: the same maps with one image per pass and with all of them."""
    torch.manual_seed(0)
    model = build_model("tiny_resnet", 3, seed=0).eval()
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    opts = {"baselines": torch.randn(5, 3, 16, 16)} if method == "gradient_shap" else {}  # draws pick among them
    one = attribute(model, x, y, method, seed=3, eval_batch=1, **opts)
    many = attribute(model, x, y, method, seed=3, eval_batch=64, **opts)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)
    other = attribute(model, x, y, method, seed=4, eval_batch=64, **opts)
    assert not torch.allclose(one, other), "the seed matters"
