"""Rewinding, interpolation and linear probes (tunelens.analysis.measures.interventions, tunelens.analysis.measures.probes)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tunelens.analysis.measures.probes as probes
from tunelens.analysis.measures.interpolation import interpolate, interpolated_state, loss_barrier, recompute_bn
from tunelens.analysis.measures.interventions import rewind
from tunelens.analysis.measures.probes import probe_gain, probe_layers
from tunelens.analysis.measures.weight_space import rewound_model, shared_keys
from tunelens.core.evaluation import evaluate
from tunelens.finetune.data import ShapesSpec, make_shapes
from tunelens.finetune.models import build_model, replace_head

STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]


def _warm_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, 16, 16, generator=g) * 1.5 + 0.3)
    model.eval()


@pytest.fixture(scope="module")
def pair():
    """A base model (8 classes) and a 'tuned' one: new 6-class head, perturbed weights, other BN statistics."""
    torch.manual_seed(0)
    base = build_model("tiny_resnet", 8, seed=0)
    _warm_bn(base, 1)
    tuned = replace_head(copy.deepcopy(base), 6, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.3 * p.std().nan_to_num(0.1) * torch.randn(p.shape, generator=g))
    _warm_bn(tuned, 3)
    return base, tuned


@pytest.fixture(scope="module")
def target():
    ds = make_shapes(ShapesSpec(task="target", image_size=16, train_per_class=6, val_per_class=1, test_per_class=8))
    return (DataLoader(ds["train"], batch_size=12, shuffle=False), DataLoader(ds["test"], batch_size=16))


def _backbone_with_head(base: nn.Module, tuned: nn.Module) -> nn.Module:
    m = copy.deepcopy(base)
    m.fc = copy.deepcopy(tuned.fc)
    return m


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shared_keys_exclude_head_and_include_bn_buffers(pair):
    base, tuned = pair
    keys = shared_keys(base, tuned)
    assert not any(k.startswith("fc.") for k in keys)
    assert "bn1.running_mean" in keys and "layer4.0.bn2.num_batches_tracked" in keys
    assert len(keys) == len(tuned.state_dict()) - 2


def test_rewind_none_and_all_but_head(pair, target):
    base, tuned = pair
    sb, st = copy.deepcopy(base.state_dict()), copy.deepcopy(tuned.state_dict())
    df = rewind(base, tuned, target[1]).table
    assert list(df["group"]) == ["none"] + STAGES + ["all_but_head"]
    assert list(df.columns) == [
        "group",
        "n_tensors",
        "n_params",
        "rel_change",
        "acc",
        "loss",
        "acc_drop",
        "loss_increase",
        "n",
    ]
    ref = evaluate(tuned, target[1])
    none = df.set_index("group").loc["none"]
    assert none["acc"] == ref["acc"] and none["loss"] == ref["loss"] and none["acc_drop"] == 0
    both = evaluate(_backbone_with_head(base, tuned), target[1])
    abh = df.set_index("group").loc["all_but_head"]
    assert abh["acc"] == both["acc"] and abh["loss"] == both["loss"]
    assert abh["acc_drop"] == pytest.approx(ref["acc"] - both["acc"])
    assert abh["n_params"] == sum(p.numel() for n, p in tuned.named_parameters() if not n.startswith("fc."))
    assert (df["n"] == 48).all()
    # the caller's models are untouched
    assert _states_equal(sb, base.state_dict()) and _states_equal(st, tuned.state_dict())


def test_rewind_one_stage_takes_its_bn_statistics(pair, target):
    base, tuned = pair
    df = rewind(base, tuned, target[1], groups=["layer2", "stem"]).table.set_index("group")
    assert list(df.index) == ["none", "layer2", "stem", "all_but_head"]
    manual = copy.deepcopy(tuned)
    sd = manual.state_dict()
    with torch.no_grad():
        for k, v in base.state_dict().items():
            if k.startswith("layer2."):
                sd[k].copy_(v)
    r = evaluate(manual, target[1])
    assert df.loc["layer2", "acc"] == r["acc"] and df.loc["layer2", "loss"] == r["loss"]
    m = rewound_model(base, tuned, "layer2")
    assert torch.equal(m.layer2[0].bn1.running_var, base.layer2[0].bn1.running_var)
    assert torch.equal(m.layer3[0].bn1.running_var, tuned.layer3[0].bn1.running_var)
    assert torch.equal(m.fc.weight, tuned.fc.weight)
    stem = rewound_model(base, tuned, "stem")
    assert torch.equal(stem.conv1.weight, base.conv1.weight) and torch.equal(
        stem.bn1.running_mean, base.bn1.running_mean
    )


def test_rewind_refuses_the_head(pair, target):
    base, tuned = pair
    with pytest.raises(ValueError, match="never rewound"):
        rewind(base, tuned, target[1], groups=["fc"])


def test_interpolated_state_endpoints_are_exact(pair):
    base, tuned = pair
    keys = shared_keys(base, tuned)
    s0, s1 = interpolated_state(base, tuned, 0.0), interpolated_state(base, tuned, 1.0)
    assert _states_equal(s1, tuned.state_dict())
    assert _states_equal(s0, _backbone_with_head(base, tuned).state_dict())
    s5 = interpolated_state(base, tuned, 0.5)
    k = "layer3.0.conv2.weight"
    assert torch.allclose(s5[k], (base.state_dict()[k] + tuned.state_dict()[k]) / 2, atol=1e-6)
    assert torch.equal(s5["fc.weight"], tuned.fc.weight) and k in keys


def test_interpolate_endpoints_reproduce_both_models(pair, target):
    base, tuned = pair
    st = copy.deepcopy(tuned.state_dict())
    res = interpolate(base, tuned, target[1], steps=3, bn="interpolate")
    df = res.table
    assert list(df["alpha"]) == [0.0, 0.5, 1.0]
    assert list(df.columns) == ["alpha", "acc", "loss", "linear_loss", "excess_loss", "n", "bn"]
    e0, e1 = evaluate(_backbone_with_head(base, tuned), target[1]), evaluate(tuned, target[1])
    assert df["acc"].iloc[0] == e0["acc"] and df["loss"].iloc[0] == e0["loss"]
    assert df["acc"].iloc[-1] == e1["acc"] and df["loss"].iloc[-1] == e1["loss"]
    assert df["excess_loss"].iloc[0] == 0 and df["excess_loss"].iloc[-1] == 0
    assert res.bn == "interpolate" and (df["bn"] == "interpolate").all()
    assert res.barrier == loss_barrier(df) == df["excess_loss"].max() >= 0
    assert _states_equal(st, tuned.state_dict())


def test_interpolate_recompute_bn(pair, target):
    base, tuned = pair
    res = interpolate(base, tuned, target[1], steps=3, bn="recompute", train_loader=target[0], bn_batches=2)
    again = interpolate(base, tuned, target[1], steps=3, bn="recompute", train_loader=target[0], bn_batches=2)
    df = res.table
    pd.testing.assert_frame_equal(df, again.table)
    assert res.bn_batches == 2 and res.bn_samples == 24 and res.bn_source == "train_loader"
    ends = res.endpoints
    assert ends["tuned"]["loss"] == evaluate(tuned, target[1])["loss"]
    assert ends["base"]["loss"] == evaluate(_backbone_with_head(base, tuned), target[1])["loss"]
    assert res.barrier == pytest.approx(loss_barrier(df)) and res.barrier >= 0
    with pytest.warns(UserWarning, match="train_loader"):
        interpolate(base, tuned, target[1], steps=2, bn="recompute", bn_batches=1)


def test_recompute_bn_is_the_cumulative_batch_average():
    model = build_model("tiny_resnet", 3, seed=0).eval()
    x = torch.randn(10, 3, 16, 16)
    with torch.no_grad():
        z = model.conv1(x)
    assert recompute_bn(model, [x]) == 10
    assert not model.training and model.bn1.momentum == 0.1
    assert torch.allclose(model.bn1.running_mean, z.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.bn1.running_var, z.var((0, 2, 3), unbiased=True), rtol=1e-4)


def test_loss_barrier_formula():
    df = pd.DataFrame({"alpha": [0.0, 0.25, 0.5, 1.0], "loss": [1.0, 2.0, 3.0, 2.0]})
    assert loss_barrier(df) == pytest.approx(3.0 - 1.5)
    with pytest.raises(ValueError):
        loss_barrier(df.iloc[:3])


def _class_data(n: int, k: int, seed: int, shuffle: bool = False):
    """Images whose channel ``c`` is bright exactly for class ``c``: pooled features separate the classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = 0.3 * torch.randn(n, k, 4, 4, generator=g)
    x[torch.arange(n), y] += 2.0
    if shuffle:
        y = y[torch.randperm(n, generator=g)]
    return DataLoader(TensorDataset(x, y), batch_size=64)


def _toy_model(k: int) -> nn.Module:
    return nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(16 * k, k))


def test_probe_separable_features_reach_100_percent():
    df = probe_layers(_toy_model(4), _class_data(200, 4, 0), _class_data(400, 4, 1), layers=["0"], name="toy")
    pd.testing.assert_frame_equal(
        df, probe_layers(_toy_model(4), _class_data(200, 4, 0), _class_data(400, 4, 1), layers=["0"], name="toy")
    )  # deterministic
    row = df.iloc[0]
    assert row["test_acc"] == 1.0 and row["train_acc"] == 1.0 and row["chance"] == 0.25
    assert row["n_features"] == 4 and row["n_train"] == 200 and row["n_test"] == 400 and row["model"] == "toy"


def test_probe_shuffled_labels_stay_near_chance():
    df = probe_layers(
        _toy_model(4), _class_data(200, 4, 0, shuffle=True), _class_data(800, 4, 1, shuffle=True), layers=["0"]
    )
    assert abs(df["test_acc"].iloc[0] - 0.25) < 0.08


@pytest.mark.slow
def test_probe_layers_auto_uses_the_shared_capture(pair, target, monkeypatch):
    base, tuned = pair
    calls = []
    real = probes.iterate_features

    def spy(*a, **kw):
        calls.append(a[2])
        return real(*a, **kw)

    monkeypatch.setattr(probes, "iterate_features", spy)
    dft = probe_layers(tuned, *target, name="tuned")
    assert len(calls) == 2
    assert list(dft["layer"]) == ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert list(dft["depth"]) == list(range(7)) and list(dft["n_features"]) == [16, 16, 32, 64, 128, 128, 6]
    assert dft["test_acc"].between(0, 1).all() and (dft["chance"] == 1 / 6).all()
    dfb = probe_layers(base, *target, name="base")
    assert len(calls) == 4 and dfb["model"].eq("base").all()
    gain = probe_gain(dfb, dft)
    assert list(gain.columns) == ["layer", "depth", "base_test_acc", "tuned_test_acc", "gain"]
    assert np.allclose(gain["gain"], 100 * (dft["test_acc"].to_numpy() - dfb["test_acc"].to_numpy()))
