"""bench/compare.py's pass counter: which passes the floor counts, and as what."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench/ is not a package here

from bench.compare import SETUP, PassCounter
from tunelens.analysis.measures.attribution.attribute import attribute_group
from tunelens.analysis.measures.attribution.prepare import prepare_for_attribution

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_pass_counter_counts_input_gradients_and_layer_gradients_apart():
    """Saliency and Integrated Gradients take the gradient at the input (forward + input gradient in the floor);
    Grad-CAM takes it at a layer (a forward in the floor); occlusion runs without autograd."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    p = prepare_for_attribution(model, x)
    forward, grad = torchvision.models.ResNet.forward, torch.autograd.grad
    want = {
        "saliency": ({}, {"grad": 4}),
        "integrated_gradients": ({"n_steps": 4}, {"grad": 16}),
        "grad_cam": ({"layer": "layer2"}, {"autograd_forward": 4}),
        "occlusion": ({"window": 16, "stride": 16}, {"no_grad": 4 * 5}),  # 4 windows and the unoccluded pass
    }
    for method, (opts, counts) in want.items():
        with PassCounter(torchvision.models.ResNet) as c:
            attribute_group([p], x, [y], method, eval_batch=4, **opts)
        got = {k: v for k, v in c.images.items() if v}
        assert got == counts, method
        part = c.parts[SETUP]
        assert {k: part[k] for k in PassCounter.KINDS if part[k]} == counts
        assert part["forward_s"] > 0
    assert torchvision.models.ResNet.forward is forward and torch.autograd.grad is grad  # restored
