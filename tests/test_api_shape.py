"""One shape for the API: functions that compare two models take ``(base, tuned, data, *, device=None, ...)``,
never move or change the caller's models, and return DataFrames or frozen dataclasses (no ``.attrs``)."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tunelens as tl
from tunelens.core.architectures import build_model

PAIR_FUNCS = {  # name -> the name of its third (data) parameter, None for weight-only functions
    "weight_deltas": None,
    "intruder_dimensions": None,
    "cka_matrix": "data",
    "cka_against_chance": "data",
    "rewind": "data",
    "interpolate": "data",
    "attribution_study": "data",
    "attribute_pair": "inputs",
}


@pytest.mark.parametrize("name", sorted(PAIR_FUNCS))
def test_signature(name):
    params = list(inspect.signature(getattr(tl, name)).parameters.values())
    assert [p.name for p in params[:2]] == ["base", "tuned"]
    if PAIR_FUNCS[name]:
        assert params[2].name == PAIR_FUNCS[name]
    dev = inspect.signature(getattr(tl, name)).parameters.get("device")
    if dev is not None:
        assert dev.kind is inspect.Parameter.KEYWORD_ONLY and dev.default is None


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        {p.device for p in model.parameters()},
        [p.requires_grad for p in model.parameters()],
    )


def _same(a, b):
    sd_a, tr_a, dev_a, rg_a = a
    sd_b, tr_b, dev_b, rg_b = b
    return (
        sd_a.keys() == sd_b.keys()
        and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        and (tr_a, dev_a, rg_a) == (tr_b, dev_b, rg_b)
    )


@pytest.fixture(scope="module")
def pair():
    base = build_model("tiny_resnet", 3, seed=0)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.layer4.parameters():
            p.add_(0.1 * torch.randn_like(p))
    base.train()  # a mix of modes: every flag must come back as it was
    tuned.eval()
    tuned.layer2.train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 3, (32,), generator=g)
    return base, tuned, DataLoader(TensorDataset(x, y), batch_size=8), x, y


def test_models_are_never_moved_or_changed(pair):
    base, tuned, loader, x, y = pair
    before = (_snapshot(base), _snapshot(tuned))
    calls = {
        "weight_deltas": lambda: tl.weight_deltas(base, tuned),
        "intruder_dimensions": lambda: tl.intruder_dimensions(base, tuned, k=3),
        "cka_matrix": lambda: tl.cka_matrix(base, tuned, loader, n_boot=10, device="cpu"),
        "cka_against_chance": lambda: tl.cka_against_chance(base, tuned, loader, n_boot=10),
        "rewind": lambda: tl.rewind(base, tuned, loader),
        "interpolate": lambda: tl.interpolate(base, tuned, loader, steps=2, train_loader=loader),
        "attribute_pair": lambda: tl.attribute_pair(base, tuned, x[:2], target=y[:2], methods=("saliency",)),
        "attribution_study": lambda: tl.attribution_study(
            base, tuned, TensorDataset(x, y), methods=("saliency",), n_images=4, n_boot=20, faithfulness=False
        ),
        "probe_layers": lambda: tl.probe_layers(tuned, loader, loader, max_iter=50),
    }
    for name, call in calls.items():
        out = call()
        assert _same(_snapshot(base), before[0]) and _same(_snapshot(tuned), before[1]), name
        for df in [out] + (
            [getattr(out, f.name) for f in dataclasses.fields(out)] if dataclasses.is_dataclass(out) else []
        ):
            if isinstance(df, pd.DataFrame):
                assert not df.attrs, f"{name} stores results in DataFrame.attrs"
        if dataclasses.is_dataclass(out) and name in ("rewind", "interpolate"):
            with pytest.raises(dataclasses.FrozenInstanceError):
                out.table = None  # type: ignore[misc]


def test_deprecated_spellings_still_work_with_a_warning(pair):
    base, tuned, loader, x, y = pair
    with pytest.warns(DeprecationWarning, match="target="):
        tl.attribute_pair(base, tuned, x[:2], targets=y[:2], methods=("saliency",))
    with pytest.warns(DeprecationWarning, match=r"\.table"):
        assert tl.rewind(base, tuned, loader)["group"].iloc[0] == "none"
