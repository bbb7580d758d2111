"""Rewinding a late stage from its recorded input (analysis/measures/resume.py): the same table as re-running the whole
network, only where the stages form a chain, within the memory cap, and never on a broken chain."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from tunelens.analysis.measures.interventions import rewind
from tunelens.core.stages import Stage, StageMap, stages
from tunelens.finetune.models import build_model


def _loader(n=40, bs=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 6
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)


def test_resumed_rewind_equals_full_rewind_and_skips_the_earlier_stages():
    a, b = build_model("tiny_resnet", 6, seed=0).eval(), build_model("tiny_resnet", 6, seed=1).eval()
    calls: dict[str, int] = {}
    hooks = [  # rewind runs a copy of b, hooks included: they count the copy's calls
        m.register_forward_hook(lambda mod, *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, m in b.named_modules()
        if n in ("conv1", "layer4")
    ]
    full = rewind(a, b, _loader(), resume=False)
    full_calls, calls = dict(calls), {}
    fast = rewind(a, b, _loader())
    for h in hooks:
        h.remove()
    assert full.resumed == () and fast.resumed == ("layer1", "layer2", "layer3", "layer4")
    pd.testing.assert_frame_equal(full.table, fast.table)  # bit for bit: the same kernels on the same inputs
    # 3 batches x 7 runs (tuned, stem, layer1..4, all_but_head) from the input; resumed: the stem runs only for
    # the tuned model, the stem rewind and all_but_head; layer4 runs as often plus once per check (4 stages)
    assert full_calls == {"conv1": 21, "layer4": 21}
    assert calls == {"conv1": 9, "layer4": 21 + 4}
    # a cap too small for any recorded input: nothing resumed, the same table
    capped = rewind(a, b, _loader(), resume_bytes=0)
    assert capped.resumed == ()
    pd.testing.assert_frame_equal(full.table, capped.table)


class _Skip(nn.Module):
    """layer2's output is added to the stem's: the stages are not a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        h = self.stem(x)
        return self.fc((self.layer2(self.layer1(h)) + h).mean((2, 3)))


def test_a_stage_that_is_not_a_chain_is_re_run_from_the_input():
    torch.manual_seed(1)
    p = _Skip().eval()
    torch.manual_seed(2)
    q = _Skip().eval()
    smap = StageMap(
        stages=(
            Stage("stem", ("stem",), (32, 32), "stem", "nchw", "stem"),
            Stage("layer1", ("layer1",), (32, 32), "layer1", "nchw"),
            Stage("layer2", ("layer2",), (32, 32), "layer2", "nchw"),
            Stage("head", ("fc",), None, "fc", "flat", "head"),
        ),
        method="by hand",
        input_shape=(1, 3, 32, 32),
    )
    full = rewind(p, q, _loader(), stage_map=smap, resume=False)
    fast = rewind(p, q, _loader(), stage_map=smap)
    assert fast.resumed == ()  # both checks failed (the stem's output is missing downstream)
    pd.testing.assert_frame_equal(full.table, fast.table)
    assert stages(p, torch.zeros(1, 3, 32, 32)).names != smap.names  # the tracer itself merges them


def test_interpolation_runs_only_the_changed_stages_after_a_frozen_prefix():
    import copy

    from tunelens.analysis.measures.interpolation import interpolate

    a = build_model("tiny_resnet", 6, seed=0).eval()
    b = copy.deepcopy(a)  # last-k fine-tuning: the stem, layer1 and layer2 stay the base's
    other = build_model("tiny_resnet", 6, seed=1)
    b.load_state_dict(
        {
            k: (v if k.startswith(("conv1", "bn1", "layer1", "layer2")) else other.state_dict()[k])
            for k, v in a.state_dict().items()
        }
    )
    train = _loader(n=48, bs=16)
    full = interpolate(a, b, _loader(), steps=6, train_loader=train, resume=False)
    calls: dict[str, int] = {}
    hook = b.get_submodule("conv1").register_forward_hook(
        lambda *_: calls.__setitem__("conv1", calls.get("conv1", 0) + 1)
    )
    fast = interpolate(a, b, _loader(), steps=6, train_loader=train)
    hook.remove()
    assert full.resumed_from is None and fast.resumed_from == "layer3"
    pd.testing.assert_frame_equal(full.table, fast.table)
    assert full.endpoints == fast.endpoints and full.barrier == fast.barrier
    # the stem ran at the first alpha only (3 BatchNorm batches + 3 test batches), then at the two endpoints
    assert calls["conv1"] == 6 + 2 * 3
    # every stage changed (full fine-tuning): nothing to resume
    assert interpolate(a, other, _loader(), steps=3, train_loader=train).resumed_from is None
