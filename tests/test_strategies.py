"""Every fine-tuning strategy trains exactly the parameters it should, and frozen BatchNorm statistics stay put.

Checked the hard way: run real optimizer steps with :func:`finetune.train.train` and
compare every parameter and buffer before and after.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import tunelens.finetune.train as ft
from tunelens.finetune.models import build_model
from tunelens.finetune.strategies import apply_freeze, set_train_mode, trainable_prefixes
from tunelens.finetune.train import TrainConfig, train

ALL = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]


def _data(n: int = 16, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _check(model, before: dict, after: dict, trains: list[str]) -> None:
    params = {n for n, _ in model.named_parameters()}
    buffers = set(before) - params
    changed = _changed(before, after)
    expected = {n for n in params if _under(n, trains)}
    assert changed & params == expected, (sorted((changed & params) ^ expected))[:5]
    # BatchNorm statistics: those of trained stages move (num_batches_tracked at least), frozen ones do not
    assert changed & buffers == {b for b in buffers if _under(b, trains)}


def _cfg(strategy: str, **kw) -> TrainConfig:
    return TrainConfig(strategy=strategy, epochs=1, batch_size=8, lr=0.1, augment=False, device="cpu", **kw)


@pytest.mark.parametrize(
    "strategy,k,trains",
    [
        ("linear_probe", 1, ["fc"]),
        ("last_k", 1, ["layer4", "fc"]),
        ("last_k", 2, ["layer3", "layer4", "fc"]),
        ("full", 1, ALL),
        ("scratch", 1, ALL),
    ],
)
def test_strategy_changes_exactly_its_parameters(strategy, k, trains):
    model = build_model("tiny_resnet", 4, seed=0)
    before = _snapshot(model)
    res = train(model, _data(), None, _cfg(strategy, last_k=k), progress=False)
    _check(model, before, _snapshot(res.model), trains)
    assert all(p.requires_grad for p in res.model.parameters())  # unfrozen again for later use
    assert [h["phase"] for h in res.history] == [strategy]


def test_lp_ft_probe_phase_then_full_phase(monkeypatch):
    """lp_ft: after the probe epoch only the head changed; the full epoch then changes everything."""
    snaps = []
    real = ft.evaluate
    model = build_model("tiny_resnet", 4, seed=0)

    def spy(m, loader, device="cpu"):  # train() evaluates once at the end of every epoch (the head alone
        snaps.append(_snapshot(model))  # on cached features in the probe phase): snapshot the whole model
        return real(m, loader, device)

    monkeypatch.setattr(ft, "evaluate", spy)
    before = _snapshot(model)
    cfg = TrainConfig(strategy="lp_ft", epochs=2, lp_epochs=1, batch_size=8, lr=0.1, augment=False, device="cpu")
    res = train(model, _data(), _data(8, 1), cfg, progress=False)
    assert [h["phase"] for h in res.history] == ["linear_probe", "full"]
    assert len(snaps) == 2
    _check(model, before, snaps[0], ["fc"])
    _check(model, snaps[0], snaps[1], ALL)


@pytest.mark.parametrize(
    "strategy,k,trains",
    [("linear_probe", 1, ["fc"]), ("last_k", 2, ["layer3", "layer4", "fc"]), ("lp_ft", 1, ["fc"]), ("full", 1, ALL)],
)
def test_freeze_and_train_mode(strategy, k, trains):
    """requires_grad follows the prefixes; frozen modules (BatchNorm included) are in eval mode."""
    model = build_model("tiny_resnet", 4, seed=0)
    prefixes = trainable_prefixes(model, strategy, k)
    names = apply_freeze(model, prefixes)
    assert set(names) == {n for n, _ in model.named_parameters() if _under(n, trains)}
    set_train_mode(model, prefixes)
    for n, m in model.named_modules():
        if n and isinstance(m, torch.nn.BatchNorm2d):
            assert m.training == _under(n, trains), n


def test_last_k_bounds():
    model = build_model("tiny_resnet", 4, seed=0)
    with pytest.raises(ValueError, match="last_k"):
        trainable_prefixes(model, "last_k", 0)
    with pytest.raises(ValueError, match="unknown strategy"):
        trainable_prefixes(model, "nope")


def test_head_lr_applies_to_the_head_only_when_the_backbone_trains():
    from tunelens.finetune.train import TrainConfig, _make_optimizer

    model = build_model("tiny_resnet", 4, seed=0)
    opt = _make_optimizer(model, TrainConfig(lr=0.01, head_lr=0.1), 0.01, "fc")
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.fc.weight)] == by_param[id(model.fc.bias)] == 0.1
    assert by_param[id(model.conv1.weight)] == by_param[id(model.layer4[0].bn2.bias)] == 0.01
    assert {g["weight_decay"] for g in opt.param_groups if any(p is model.fc.bias for p in g["params"])} == {0.0}
    for n, p in model.named_parameters():  # a head-only phase: the phase's rate is the head's
        p.requires_grad_(n.startswith("fc."))
    opt = _make_optimizer(model, TrainConfig(lr=0.01, head_lr=0.1), 0.5, "fc")
    assert {g["lr"] for g in opt.param_groups} == {0.5}


@pytest.mark.parametrize("strategy", ["linear_probe", "lp_ft"])
def test_cached_probe_features_train_the_same_head(strategy):
    """The probe on cached head inputs equals the probe that runs the frozen backbone every step."""
    out = {}
    for cache in (True, False):
        model = build_model("tiny_resnet", 4, seed=0)
        cfg = TrainConfig(
            strategy=strategy,
            epochs=3,
            lp_epochs=2,
            batch_size=8,
            lr=0.1,
            augment=False,
            device="cpu",
            cache_features=cache,
        )
        out[cache] = train(model, _data(), _data(8, 1), cfg, progress=False)
    a, b = out[True].model.state_dict(), out[False].model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    for ha, hb in zip(out[True].history, out[False].history, strict=True):
        assert ha["val_acc"] == hb["val_acc"] and ha["train_acc"] == hb["train_acc"]
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
