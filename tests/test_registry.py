"""The analysis registry: every analysis is one registered module; the suite, the configuration and the report
loop over it; a failing analysis is recorded and never loses the others."""

from __future__ import annotations

import copy
import dataclasses

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from tunelens.analysis.engine import registry
from tunelens.analysis.suite import analyze_models
from tunelens.config import DEFAULT_CONFIG
from tunelens.core.architectures import build_model
from tunelens.core.results import Results
from tunelens.reports.render import render_html


def test_registry_declares_each_analysis():
    names = [a.name for a in registry.registered()]
    assert names[0] == "evaluation" and names[-1] == "strategies"
    assert {"weights", "cka", "attribution", "functional"} <= set(names)
    for a in registry.registered():
        assert a.tables and all(isinstance(t, str) for t in a.tables), a.name
        assert callable(a.run) and callable(a.findings)
    defaults = registry.analysis_defaults()
    assert defaults == DEFAULT_CONFIG["analysis"]
    assert {a.name for a in registry.registered() if a.optional} <= set(defaults)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(dataclasses.replace(registry.get("cka"), title="another"))


@pytest.fixture()
def small():
    base = build_model("tiny_resnet", 3, seed=0)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.layer4.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 16, 16, generator=g), torch.arange(24) % 3
    data = {"train": TensorDataset(x[:12], y[:12]), "test": TensorDataset(x[12:], y[12:])}
    manifests = {"base": {"role": "base"}, "tuned": {"role": "tuned", "strategy": "full"}}
    settings = dict(DEFAULT_CONFIG["analysis"], primary="tuned", attribution=False, interpolation_steps=2)
    return {"base": base, "tuned": tuned}, manifests, data, settings


def test_a_failing_analysis_is_recorded_and_the_others_run(small, monkeypatch):
    models, manifests, data, settings = small

    def boom(ctx):
        raise RuntimeError("simulated failure\nin two lines")

    monkeypatch.setitem(registry._REGISTRY, "cka", dataclasses.replace(registry.get("cka"), run=boom))
    res = analyze_models(
        models, manifests, data, settings, device=torch.device("cpu"), progress=False, log=lambda *_: None
    )
    assert res.summary["failed"] == {"cka": "RuntimeError: simulated failure in two lines"}
    assert "cka_chance" not in res.tables  # nothing half-written
    for table in ("accuracy", "weight_stages", "rewind", "probes", "strategies"):
        assert isinstance(res.tables.get(table), pd.DataFrame) and len(res.tables[table]), table
    assert res.summary["skipped"]["attribution"].startswith("disabled in the configuration")
    page = render_html(res)
    assert "Failed: <b>cka</b>: RuntimeError: simulated failure in two lines" in page


def test_cli_exits_1_when_an_analysis_failed(tmp_path, capsys):
    from tunelens.cli import _failed_status

    res = Results(summary={"failed": {"cka": "RuntimeError: x"}})
    res.save(tmp_path / "results")
    assert _failed_status(tmp_path) == 1
    assert "1 analysis step(s) failed (cka)" in capsys.readouterr().err
    Results(summary={"failed": {}}).save(tmp_path / "results")
    assert _failed_status(tmp_path) == 0


def test_findings_link_to_the_figure_of_their_table():
    from tunelens.reports.model import Figure, Section, Table
    from tunelens.reports.render import evidence_anchors

    secs = [
        Section(
            "s",
            "S",
            blocks=[
                Table("tbl-rewind", "t", pd.DataFrame({"a": [1]}), csv="rewind"),
                Figure("fig-rewind", "f", "data:,", source="rewind"),
            ],
        )
    ]
    assert evidence_anchors(secs) == {"rewind": "fig-rewind", "s": "s"}
