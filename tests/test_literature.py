"""The literature's three checks read the first and the last stage of any network: ResNets (stem, layer1 vs
layer4) as before, timm's EfficientNet (stem, blocks.0 vs conv_head), stated with numbers either way."""

from __future__ import annotations

import pandas as pd
import pytest

from tunelens.analysis.findings.literature import early_late_stages, literature_checks
from tunelens.analysis.steps.functional import functional_findings

RESNET = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
EFFNET = ["stem"] + [f"blocks.{i}" for i in range(7)] + ["conv_head", "head"]
PROBE_LAYERS = {"resnet": ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]}
PROBE_LAYERS["effnet"] = ["bn1"] + [f"blocks.{i}" for i in range(7)] + ["bn2", "global_pool", "classifier"]


def tables(stages: list[str], probe_layers: list[str], late_moves_more: bool = True):
    n = len(stages) - 1  # without the head
    rel = [0.001 * (i + 1) if late_moves_more else 0.001 * (n - i) for i in range(n)] + [1.0]
    st = pd.DataFrame({"model": "full", "stage": stages, "depth": range(len(stages)), "relative": rel})
    groups = ["none", *stages[:-1], "all_but_head"]
    drops = [0.0] + [0.01 * i for i in range(n)] + [0.5]
    rw = pd.DataFrame({"model": "full", "group": groups, "acc_drop": drops, "acc": 0.9, "n": 100})
    gains = pd.DataFrame(
        {"layer": probe_layers, "depth": range(len(probe_layers)), "gain": [float(i) for i in range(len(probe_layers))]}
    )
    gains["base_test_acc"], gains["tuned_test_acc"] = 0.5, 0.6
    return rw, gains, st


@pytest.mark.parametrize(
    "stages,probe,early,late",
    [(RESNET, "resnet", "stem and layer1", "layer4"), (EFFNET, "effnet", "stem and blocks.0", "conv_head")],
)
def test_three_checks_on_first_and_last_stage(stages, probe, early, late):
    rw, gains, st = tables(stages, PROBE_LAYERS[probe])
    checks = literature_checks(rw, gains, st, "full")
    assert len(checks) == 3 and not any("not as expected" in c for c in checks)
    assert f"of {early} " in checks[0] and f"vs {late} " in checks[0]
    assert f"than rewinding {late}" in checks[1]
    assert late in checks[2]
    found = {f.id: f for f in functional_findings(rw, None, None, gains, st, "full")}
    assert "3 of 3 hold" in found["literature"].text and found["literature"].kind == "result"


def test_checks_that_fail_are_stated_with_numbers():
    rw, gains, st = tables(EFFNET, PROBE_LAYERS["effnet"], late_moves_more=False)
    checks = literature_checks(rw, gains, st, "full")
    assert checks[0].startswith("early layers change not least") and checks[0].endswith("[not as expected]")
    assert "%" in checks[0]


def test_early_late_stages():
    assert early_late_stages(RESNET) == (["stem", "layer1"], "layer1", "layer4")
    assert early_late_stages(["features.0", "features.1", "features.2", "head"]) == (
        ["features.0"],
        "features.0",
        "features.2",
    )
    assert early_late_stages(["stem", "head"]) is None
