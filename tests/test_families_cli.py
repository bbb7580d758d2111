"""`tunelens compare` on SqueezeNet (a 1x1 Conv2d head: the probe head used to stop it) and on a
``module:function`` factory whose blocks live in an nn.ModuleList."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from tunelens.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from _families import tuned_copy
from test_compare_cli import make_images

FAST = [
    "--limit",
    "12",
    "--no-progress",
    "--device",
    "cpu",
    "--set",
    "analysis.attribution_images=2",
    "--set",
    "analysis.attribution_methods=saliency,grad_cam",
    "--set",
    "analysis.interpolation_steps=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["squeezenet1_1", "_families:list_net"])
def test_compare_runs_every_analysis(arch, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    data = make_images(tmp_path / "data", size=64)
    torch.manual_seed(0)
    if arch == "squeezenet1_1":
        base = torchvision.models.squeezenet1_1(num_classes=10)
    else:
        from _families import list_net

        base = list_net(num_classes=10)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    torch.save(tuned_copy(base, 3).state_dict(), tmp_path / "tuned.pt")
    out = tmp_path / "out"
    argv = [
        "compare",
        "--arch",
        arch,
        "--base",
        str(tmp_path / "base.pt"),
        "--tuned",
        str(tmp_path / "tuned.pt"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--image-size",
        "64",
    ]
    assert main(argv + FAST) == 0
    summary = json.loads(next(out.rglob("summary.json")).read_text())
    assert summary.get("failed", {}) == {}
    assert summary["stages"]["gradcam_layer"] not in (None, "_avg_pooling")
    assert len([s for s in summary["stages"]["stages"] if s["kind"] == "body"]) >= 3
