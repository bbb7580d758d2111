"""Findings that stay true: controlled pairs of tiny ResNets and the sentences they must (not) produce."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tunelens.analysis.engine.registry import analysis_defaults
from tunelens.analysis.steps.attribution import attribution_findings
from tunelens.analysis.steps.similarity import similarity_findings
from tunelens.analysis.suite import analyze_models
from tunelens.core.architectures import TinyResNet

sys.path.insert(0, str(Path(__file__).parent))
from _families import toy_data

NONFINITE = re.compile(r"(?<![A-Za-z])(nan|inf)(?![A-Za-z])", re.I)


def net(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet(num_classes=3, widths=(4, 8, 8, 8))


def run(base, tuned, n_test: int = 24):
    s = analysis_defaults()
    s.update(attribution=False, interpolation_steps=2, batch_size=8)
    res = analyze_models(
        {"base": base, "full": tuned},
        {"base": {"role": "base"}, "full": {"role": "tuned", "strategy": "full"}},
        {"train": toy_data(24, 32), "test": toy_data(n_test, 32, seed=1)},
        s,
        device=torch.device("cpu"),
        progress=False,
        log=lambda _m: None,
        random_like=lambda seed: net(seed),
    )
    assert res.summary["failed"] == {}
    found = {f["id"]: f for f in res.summary["findings"]}
    for f in found.values():
        assert not NONFINITE.search(f["text"] + (f["uncertainty"] or "")), f
    return found


@pytest.mark.slow
def test_identical_models_nothing_changed():
    base = net()
    f = run(base, copy.deepcopy(base))
    assert "nothing changed" in f["weights_frozen_full"]["text"]
    assert "unchanged at every compared layer" in f["cka"]["text"] and "diverges most" not in f["cka"]["text"]
    assert "rises most" not in f["probe_gain"]["text"]
    assert "No single stage" in f["rewind"]["text"]


@pytest.mark.slow
def test_head_only_change():
    base = net()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.fc.weight.add_(torch.randn_like(tuned.fc.weight))
    f = run(base, tuned)
    assert "only the head was trained" in f["weights_frozen_full"]["text"]
    assert "diverges most" not in f["cka"]["text"]


@pytest.mark.slow
def test_one_stage_reinitialised_is_named():
    base = net()
    tuned = copy.deepcopy(base)
    torch.manual_seed(5)
    for m in tuned.layer3.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    f = run(base, tuned)
    assert f["weights_full"]["text"].startswith("full: layer3 moved most")


@pytest.mark.slow
def test_unrelated_random_network_is_not_called_kept():
    f = run(net(0), net(123))
    assert "features were kept" not in f["cka"]["text"]


@pytest.mark.slow
def test_tiny_data_opens_with_a_caveat():
    base = net()
    f = run(base, copy.deepcopy(base), n_test=8)
    first = next(iter(f.values()))
    assert first["id"] == "small_data" and "only 8 test images" in first["text"]
    assert "few test images" in f["cka"]["uncertainty"]
    assert "few test images" not in (f["weights_frozen_full"]["uncertainty"] or "")


def test_cka_sentence_never_contradicts_itself():
    """The bad example: CKA 1.00 'diverges most', a nan CI, and 'largely replaced' against a 0.94 baseline."""
    t = pd.DataFrame(
        {
            "layer": ["a", "b"],
            "cka_base_tuned": [0.999, 0.995],
            "ci_low": [float("nan")] * 2,
            "ci_high": [float("nan")] * 2,
            "cka_base_random": [0.97, 0.94],
            "cka_tuned_scratch": [float("nan")] * 2,
            "estimator": "x",
        }
    )
    (f,) = similarity_findings(t, "full")
    assert "unchanged" in f.text and "nan" not in f.text + (f.uncertainty or "")
    assert "one batch" in f.uncertainty
    t["cka_base_tuned"] = [0.98, 0.5]
    t["ci_low"], t["ci_high"] = [0.97, 0.4], [0.99, 0.6]
    (f,) = similarity_findings(t, "full")
    assert "b diverges most" in f.text and "below 0: less alike than random weights" in f.text
    assert "features were replaced" in f.text
    t["cka_base_random"] = [0.97, 0.96]
    (f,) = similarity_findings(t, "full")
    assert "cannot tell kept features from replaced" in f.text
    t["cka_base_random"] = [0.5, 0.2]
    t["ci_low"], t["ci_high"] = [0.97, 0.1], [0.99, 0.9]
    (f,) = similarity_findings(t, "full")
    assert "chance-corrected 0.37" in f.text and "the data cannot say which" in f.text


def test_change_index_outside_unit_interval_is_explained():
    summ = pd.DataFrame(
        [
            {
                "method": "grad_cam",
                "informative": True,
                "change_index": 1.88,
                "change_index_lo": 1.2,
                "change_index_hi": 2.1,
                "ceiling": 0.44,
                "floor": 0.2,
                "n": 40,
                "similarity": "spearman_abs",
            }
        ]
    )
    fs = attribution_findings(summ, None, pd.DataFrame(), "full")
    assert "above 1: beyond the randomized network" in fs[0].text
    summ.loc[0, ["change_index_lo", "change_index_hi"]] = [float("nan"), float("nan")]
    fs = attribution_findings(summ, None, pd.DataFrame(), "full")
    assert fs[0].uncertainty.startswith("no CI")


def test_per_class_change_index_above_one_is_explained():
    summ = pd.DataFrame(
        [
            {
                "method": "grad_cam",
                "informative": True,
                "change_index": 0.6,
                "change_index_lo": 0.4,
                "change_index_hi": 0.8,
                "ceiling": 0.8,
                "floor": 0.1,
                "n": 40,
                "similarity": "spearman_abs",
            }
        ]
    )
    per_class = pd.DataFrame(
        [
            {
                "method": "grad_cam",
                "class": "t_shape",
                "change_index": 1.73,
                "ab": -0.46,
                "ab_lo": -0.6,
                "ab_hi": -0.3,
                "n": 20,
            },
            {
                "method": "grad_cam",
                "class": "heart",
                "change_index": 0.3,
                "ab": 0.6,
                "ab_lo": 0.5,
                "ab_hi": 0.7,
                "n": 20,
            },
        ]
    )
    fs = attribution_findings(summ, None, per_class, "full")
    (f,) = [f for f in fs if f.id == "attr_class"]
    assert "class t_shape (change index 1.73 (above 1: beyond the randomized network);" in f.text
    per_class.loc[0, ["ab", "ab_lo", "ab_hi"]] = [0.01, -0.08, 0.09]  # a CI across 0 (t_shape is still clear)
    per_class.loc[1, ["ab_lo", "ab_hi"]] = [0.3, 0.7]
    (f,) = [f for f in attribution_findings(summ, None, per_class, "full") if f.id == "attr_class"]
    assert "similarity 95% CI -0.08 to 0.09 over 20" in f.uncertainty and "-0.08-0.09" not in f.uncertainty


def test_intervals_are_printed_with_to():
    """Every CI goes through one helper: ``-0.08 to 0.09``, never ``-0.08-0.09``."""
    from tunelens.analysis.findings import span

    assert span(-0.08, 0.09) == "-0.08 to 0.09"
    assert span(-0.012, 0.034, "+.1f", 100) == "-1.2 to +3.4"


def _text_cka(cka, half_width=0.03, rnd=0.3):
    n = len(cka)
    return pd.DataFrame(
        {
            "layer": [f"masked_mean.layer{i + 2}" for i in range(n)],
            "cka_base_tuned": cka,
            "ci_low": [max(0.0, x - half_width) for x in cka],
            "ci_high": [min(1.0, x + half_width) for x in cka],
            "cka_base_random": [rnd] * n,
            "cka_tuned_scratch": [float("nan")] * n,
            "estimator": "x",
        }
    )


def test_cka_collapse_names_the_break_and_the_layers_above():
    """The text preset: 0.87 at layer 2, 0.12 at layer 3, 0.02 above: the break is named, not 'not clearly below'."""
    t = _text_cka([0.87, 0.12, 0.02, 0.02], half_width=0.02)
    (f,) = similarity_findings(t, "full")
    assert "falls from 0.87 at masked_mean.layer2" in f.text and "to 0.12 at masked_mean.layer3" in f.text
    assert "stays at 0.02 above (masked_mean.layer4 to masked_mean.layer5)" in f.text
    assert "the top layers were reorganised" in f.text and "not clearly below" not in f.text
    # the drop is inside the noise: no break is claimed
    (f,) = similarity_findings(_text_cka([0.87, 0.12, 0.02, 0.02], half_width=0.4), "full")
    assert "falls from" not in f.text
    # a later layer recovers: the CKA does not stay low, no break
    (f,) = similarity_findings(_text_cka([0.87, 0.12, 0.02, 0.80]), "full")
    assert "falls from" not in f.text and "reorganised" not in f.text


def test_cka_collapse_on_the_cls_token_is_told_beside_the_masked_mean():
    """The text preset's [CLS] readouts 0.95, 0.53, 0.04, 0.19: the break is where CKA falls and does not recover."""
    mean = _text_cka([0.87, 0.12, 0.02, 0.02], half_width=0.02)
    cls = _text_cka([0.95, 0.53, 0.04, 0.19], half_width=0.03)
    cls["layer"] = [f"cls.layer{i + 2}" for i in range(4)]
    t = pd.concat([mean.assign(pooling="masked mean"), cls.assign(pooling="[CLS]")], ignore_index=True)
    (f,) = similarity_findings(t, "full")
    assert f.text.count("the top layers were reorganised") == 2
    assert "On the [CLS] token base-vs-tuned CKA falls from 0.95 at cls.layer2" in f.text
    assert "to 0.53 at cls.layer3 (0.50 to 0.56) and stays at 0.04 to 0.19 above (cls.layer4 to cls.layer5)" in f.text


def test_cka_low_everywhere_says_so_and_invents_no_break():
    t = _text_cka([0.10, 0.05, 0.02, 0.02], half_width=0.01)
    (f,) = similarity_findings(t, "full")
    assert "low at every compared layer (0.02 to 0.10 from masked_mean.layer2 to masked_mean.layer5" in f.text
    assert "falls from" not in f.text and "reorganised" not in f.text and "diverges most" not in f.text
