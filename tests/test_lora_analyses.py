"""The LoRA-facing analysis steps on tiny models: intruder dimensions (with their control), forgetting of the
source task, LoRA-vs-full CKA; each skips with a reason when its inputs are missing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from tunelens.analysis.engine.registry import Context, analysis_defaults
from tunelens.analysis.steps import forgetting, intruders, lora
from tunelens.core.architectures import TinyResNet, replace_head
from tunelens.core.results import Results

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int, classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % classes)


def _ctx(models: dict, mans: dict, data: dict) -> Context:
    tuned = [n for n, m in mans.items() if m["role"] == "tuned"]
    return Context(
        models=models,
        manifests=mans,
        data=data,
        settings=analysis_defaults(),
        device=torch.device("cpu"),
        primary=tuned[0],
        tuned=tuned,
        progress=False,
        log=lambda *a: None,
        results=Results(),
    )


def _base() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet(num_classes=4, widths=(8, 8, 16, 16)).eval()


def _same_backbone(base: TinyResNet) -> TinyResNet:
    tuned = copy.deepcopy(base)
    replace_head(tuned, 3, seed=1)
    return tuned.eval()


def _with_new_direction(base: TinyResNet) -> TinyResNet:
    """layer4's conv2 plus a rank-1 direction orthogonal to every left singular vector of the base weight
    (the base weight made rank-deficient first, so such a direction exists), scaled above the top one."""
    tuned = _same_backbone(base)
    with torch.no_grad():
        w = base.layer4[0].conv2.weight
        m = w.reshape(w.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        s[-1] = 0.0
        low = (u * s) @ vh
        base.layer4[0].conv2.weight.copy_(low.reshape(w.shape).float())
        new = low + 10 * s[0] * torch.outer(u[:, -1], vh[-1])
        tuned.layer4[0].conv2.weight.copy_(new.reshape(w.shape).float())
    return tuned


MANS = {"base": {"role": "base"}, "full": {"role": "tuned", "strategy": "full"}}


def test_intruders_zero_for_the_base_itself_and_counted_for_a_new_direction():
    base = _base()
    same = intruders.run(_ctx({"base": base, "full": _same_backbone(base)}, MANS, {}))
    t = same.tables[intruders.INTRUDERS]
    assert (t[t["kind"] == "tuned"]["intruders"] == 0).all()
    assert {"k", "threshold", "stage"} <= set(t.columns)
    new = intruders.run(_ctx({"base": base, "full": _with_new_direction(base)}, MANS, {}))
    st = new.tables[intruders.INTRUDER_STAGES]
    tuned = st[st["kind"] == "tuned"].set_index("stage")
    assert tuned.loc["layer4", "intruders"] >= 1
    assert tuned.drop(index="layer4")["intruders"].sum() == 0
    assert (st["kind"] == "control").any()  # the random perturbation of matching norm
    res = Results(tables=dict(new.tables), summary={"primary": "full"})
    (f,) = intruders.findings(res)
    assert "layer4" in f.text and f.evidence == intruders.INTRUDER_STAGES


def test_forgetting_is_zero_when_the_backbone_equals_the_base():
    base = _base()
    models = {"base": base, "full": _same_backbone(base)}
    data = {"source_train": _data(48, 4, 1), "source_test": _data(24, 4, 2)}
    out = forgetting.run(_ctx(models, MANS, data))
    row = out.tables[forgetting.FORGETTING].iloc[0]
    assert row["head_drop"] == 0 and row["probe_drop"] == 0
    assert row["head_drop_lo"] == 0 and row["head_drop_hi"] == 0
    assert forgetting.FORGETTING_REWIND not in out.tables  # nothing forgotten, nothing to restore


def test_forgetting_rewind_restores_a_changed_stage_and_skips_without_source_data():
    base = _base()
    tuned = _same_backbone(base)
    with torch.no_grad():
        for p in tuned.layer2.parameters():
            p.mul_(-1.0)  # wreck one stage
    models = {"base": base, "full": tuned}
    data = {"source_train": _data(48, 4, 1), "source_test": _data(64, 4, 2)}
    out = forgetting.run(_ctx(models, MANS, data))
    rw = out.tables.get(forgetting.FORGETTING_REWIND)
    if rw is not None:  # the base's random head may lose nothing on random data; when it does, layer2 restores it
        r = rw.set_index("group")
        assert r.loc["layer2", "restored"] == pytest.approx(r.loc["layer2", "drop"])
    assert forgetting.run(_ctx(models, MANS, {})).skipped


def test_lora_vs_full_cka_per_stage_and_skip():
    base = _base()
    mans = {**MANS, "lora": {"role": "tuned", "strategy": "lora"}}
    full = _same_backbone(base)
    models = {"base": base, "full": full, "lora": copy.deepcopy(full)}
    ctx = _ctx(models, mans, {"test": _data(32, 3, 3)})
    out = lora.run(ctx)
    t = out.tables[lora.CKA_LORA]
    assert set(t["layer"]) >= {"layer1", "layer4"}
    assert (t["cka"] > 0.99).all()  # identical models
    assert lora.run(_ctx({"base": base, "full": full}, MANS, {"test": _data(8, 3, 3)})).skipped
