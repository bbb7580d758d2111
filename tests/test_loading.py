"""Loading checkpoints tunelens did not write (tunelens.analysis.io.loading): layouts, safety, and clear errors.

Checkpoints are made with plain torch / torchvision code, never with tunelens.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tunelens.analysis.io.loading import (
    CheckpointArchitectureError,
    CheckpointLoadError,
    ClassCountError,
    check_finite,
    infer_num_classes,
    load_model,
    load_report,
    load_state_dict,
    suggest_archs,
    torchvision_weights_file,
)


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LAYOUTS = {
    "plain.pt": lambda sd: sd,
    "lightning.ckpt": lambda sd: {
        "epoch": 3,
        "global_step": 12,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "optimizer_states": [],
        "hyper_parameters": {"lr": 0.1},
    },
    "nested_state_dict.pth": lambda sd: {"state_dict": sd, "epoch": 1},
    "torchvision_reference.pth": lambda sd: {
        "model": sd,
        "optimizer": {"state": {}, "param_groups": []},
        "lr_scheduler": {},
        "epoch": 9,
        "args": argparse.Namespace(lr=0.1, model="resnet18"),
    },
    "model_state_dict.pt": lambda sd: {"model_state_dict": sd, "loss": 0.5},
    "ddp.pt": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "compiled.pt": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    "ddp_compiled.pt": lambda sd: {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts(tmp_path, sd, name):
    path = tmp_path / name
    torch.save(LAYOUTS[name](sd), path)
    model = load_model("resnet18", path)
    assert model.fc.out_features == 5 and not model.training
    assert _same(model.state_dict(), sd)


def test_safetensors_and_legacy_format(tmp_path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    assert _same(load_state_dict(tmp_path / "w.safetensors"), sd)
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert _same(load_state_dict(tmp_path / "legacy.pt"), sd)
    # a state dict is accepted as is, and num_batches_tracked may be absent
    light = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert _same(
        {k: v for k, v in load_model("resnet18", light).state_dict().items() if not k.endswith("num_batches_tracked")},
        light,
    )


@pytest.mark.parametrize("how", ["os_system", "builtins_open", "plain_pickle", "legacy_torch"])
def test_code_running_pickle_is_refused_and_not_run(tmp_path, how):
    marker = tmp_path / f"marker_{how}"

    class Evil:
        def __reduce__(self):
            if how == "builtins_open":
                return (open, (str(marker), "w"))
            return (os.system, (f"touch '{marker}'",))

    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"fc.weight": torch.zeros(2, 2)}, "extra": Evil()}
    if how == "plain_pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    elif how == "legacy_torch":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointLoadError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert "refused" in msg and ("system" in msg or "open" in msg), msg
    assert "torch.save(model.state_dict()" in msg and "safetensors" in msg
    with pytest.raises(CheckpointLoadError):
        load_model("resnet18", path)
    assert not marker.exists()


def test_bad_files(tmp_path, sd):
    with pytest.raises(CheckpointLoadError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointLoadError, match="empty"):
        load_state_dict(tmp_path / "empty.pt")
    torch.save(sd, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt"):
        load_state_dict(tmp_path / "trunc.pt")
    save_file({"a": torch.zeros(10)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt"):
        load_state_dict(tmp_path / "trunc.safetensors")
    (tmp_path / "notes.pt").write_text("these are not weights")
    with pytest.raises(CheckpointLoadError, match="not a checkpoint"):
        load_state_dict(tmp_path / "notes.pt")
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html>404</html>")
    with pytest.raises(CheckpointLoadError, match="HTML"):
        load_state_dict(tmp_path / "page.pth")
    torch.save({"epoch": 3, "best_acc": 0.9}, tmp_path / "no_tensors.pt")
    with pytest.raises(CheckpointLoadError, match="holds no tensors"):
        load_state_dict(tmp_path / "no_tensors.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointLoadError, match="single tensor"):
        load_state_dict(tmp_path / "tensor.pt")
    torch.save({"fc.weight": torch.zeros(2, 2), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointLoadError, match="'epoch'"):
        load_state_dict(tmp_path / "mixed.pt")
    with pytest.raises(CheckpointLoadError, match="folder"):
        load_state_dict(tmp_path)


def test_architecture_mismatch_names_keys_and_suggests_arch(tmp_path, sd):
    torch.save(sd, tmp_path / "r18.pt")
    with pytest.raises(CheckpointArchitectureError) as e:
        load_model("resnet34", tmp_path / "r18.pt")
    msg = str(e.value)
    assert "missing key" in msg and "layer1.2" in msg and "--arch resnet18" in msg
    with pytest.raises(CheckpointArchitectureError) as e:
        load_model("resnet50", tmp_path / "r18.pt")
    msg = str(e.value)
    assert "mis-shaped" in msg and "layer1.0.conv1.weight" in msg and "resnet18" in msg
    assert suggest_archs(sd, "resnet50")[0] == ("resnet18", 1.0)
    # one key missing: named, and no other architecture offered (none fits better)
    torch.save({k: v for k, v in sd.items() if k != "layer2.0.bn1.running_var"}, tmp_path / "r18_less.pt")
    with pytest.raises(CheckpointArchitectureError) as e:
        load_model("resnet18", tmp_path / "r18_less.pt")
    msg = str(e.value)
    assert "1 missing key(s): layer2.0.bn1.running_var" in msg and "Every other tensor fits resnet18" in msg
    assert "resnet34" not in msg and "try" not in msg and "%" not in msg
    # a non-strict load keeps what fits
    with pytest.warns(UserWarning, match="non-strictly: .*missing"):
        m = load_model("resnet34", tmp_path / "r18.pt", strict=False)
    assert not hasattr(m, "load_report")
    assert "layer1.2.conv1.weight" in load_report(m, sd).missing


def test_class_count(tmp_path, sd):
    torch.save(sd, tmp_path / "r18.pt")
    assert infer_num_classes("resnet18", sd) == 5
    assert load_model("resnet18", tmp_path / "r18.pt", num_classes=5).fc.out_features == 5
    with pytest.raises(ClassCountError, match="5-class head"):
        load_model("resnet18", tmp_path / "r18.pt", num_classes=3)


def test_integer_weights_are_refused_not_cast(sd):
    bad = dict(sd)
    bad["conv1.weight"] = (sd["conv1.weight"] * 100).long()
    with pytest.raises(CheckpointLoadError, match=r"holds torch.int64 tensors where the model has floating-point "):
        load_model("resnet18", bad)
    ok = load_model("resnet18", sd)  # num_batches_tracked is int64 in both: no complaint
    assert torch.equal(ok.state_dict()["conv1.weight"], sd["conv1.weight"])


def test_check_finite(sd):
    bad = dict(sd)
    bad["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"].clone()
    bad["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    bad["fc.bias"] = torch.full_like(sd["fc.bias"], float("inf"))
    assert check_finite(sd) == []
    assert check_finite(bad) == ["layer1.0.conv1.weight", "fc.bias"]


def test_torchvision_weights_from_local_cache_only(tmp_path, monkeypatch, sd):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(CheckpointLoadError) as e:
        load_model("resnet18", "torchvision:IMAGENET1K_V1")
    msg = str(e.value)
    want = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(want) in msg and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    with pytest.raises(CheckpointLoadError, match="no weights 'IMAGENET9K'"):
        load_model("resnet18", "torchvision:IMAGENET9K")
    # with the file in the cache (a stand-in of the right shapes) both spellings load it
    want.parent.mkdir(parents=True)
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18().state_dict()
    torch.save(imagenet, want)
    for spec in ("torchvision:IMAGENET1K_V1", "torchvision:ResNet18_Weights.IMAGENET1K_V1", "torchvision:DEFAULT"):
        m = load_model("resnet18", spec)
        assert m.fc.out_features == 1000 and torch.equal(m.fc.weight, imagenet["fc.weight"])
    assert torchvision_weights_file("resnet18", "torchvision:IMAGENET1K_V1") == want
    with pytest.raises(CheckpointLoadError, match="ResNet34_Weights"):
        load_model("resnet18", "torchvision:ResNet34_Weights.IMAGENET1K_V1")


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "byo_loading_nets.py").write_text(
        "from torch import nn\n"
        "def small(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(4, num_classes))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    net = importlib.import_module("byo_loading_nets").small(num_classes=7)
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "net.pt")
    m = load_model("byo_loading_nets:small", Path("net.pt"))
    assert m[4].out_features == 7 and _same(m.state_dict(), net.state_dict())


def test_lightning_attribute_dict_hyperparameters(tmp_path, monkeypatch, sd):
    """Lightning stores hyper-parameters as an AttributeDict: read as a plain dict, without Lightning installed."""
    import sys
    import types

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = "lightning.fabric.utilities.data"
    AttributeDict.__qualname__ = "AttributeDict"
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["lightning.fabric.utilities.data"].AttributeDict = AttributeDict
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "hyper_parameters": AttributeDict(lr=0.1, arch="resnet18"),
        },
        tmp_path / "pl.ckpt",
    )
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data"):
        monkeypatch.delitem(sys.modules, name)
    assert _same(load_model("resnet18", tmp_path / "pl.ckpt").state_dict(), sd)
