"""The time budget (analysis/engine/budget.py): predicted costs by hand, the order of the reductions, and a tiny budget
end to end: the report says what was reduced and the affected findings carry it in their uncertainty."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from tunelens.analysis.engine.budget import (
    MAP_SETS,
    PassCosts,
    attribution_cost,
    fit_attribution,
    fit_functional,
    functional_cost,
    measure_pass_costs,
    resolve_budget,
)
from tunelens.analysis.measures.attribution.methods import DROP_ORDER
from tunelens.analysis.steps.functional import balanced_subset

UNIT = PassCosts(forward_s=1.0, backward_s=10.0, batch=8)
ALL = ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradient_shap", "occlusion", "grad_cam",
       "guided_backprop"]  # fmt: skip


def test_attribution_cost_by_hand():
    # saliency: 5 map sets x 1 backward (10 s) per image; 3 images
    assert attribution_cost(["saliency"], 3, {}, UNIT, side=32, faithfulness=()) == 3 * MAP_SETS * 10
    # IG with 16 steps plus its deletion/insertion games: 2 models x 2 games x 17 forward passes
    ig = attribution_cost(["integrated_gradients"], 1, {"integrated_gradients": {"n_steps": 16}}, UNIT, side=32)
    assert ig == MAP_SETS * 16 * 10 + 2 * 2 * 17 * 1
    # occlusion at 32 px: window 8, stride 6 -> 5 x 5 positions (+1 unoccluded pass), forward only
    assert attribution_cost(["occlusion"], 1, {}, UNIT, side=32, faithfulness=()) == MAP_SETS * 26
    # input x gradient with saliency: one gradient for both; alone or with options of its own: its own pass
    both = ["saliency", "input_x_gradient"]
    assert attribution_cost(both, 1, {}, UNIT, side=32, faithfulness=()) == MAP_SETS * 10
    assert attribution_cost(["input_x_gradient"], 1, {}, UNIT, side=32, faithfulness=()) == MAP_SETS * 10
    assert attribution_cost(both, 1, {"saliency": {"abs": True}}, UNIT, side=32, faithfulness=()) == 2 * MAP_SETS * 10


def test_functional_cost_by_hand():
    # rewind: 2 tuned x 4 stage groups x 10 test; interpolation: 3 steps x (10 test + 20 train); probes: 3 x 20
    # train (their test features, the reference accuracy and the endpoints come from the shared test pass)
    assert functional_cost(10, 20, 2, 4, 3, 3, UNIT) == 2 * 4 * 10 + 3 * 30 + 3 * 20
    # batch-norm re-estimation reads at most 4 batches of 64 training images
    assert functional_cost(10, 1000, 1, 1, 1, 0, UNIT) == 10 + (10 + 256)


def test_nothing_is_reduced_when_it_fits():
    full = attribution_cost(ALL, 16, {}, UNIT, side=32)
    plan = fit_attribution(full + 1, ALL, 16, {}, UNIT, side=32)
    assert (plan.methods, plan.n_images, plan.options, plan.faithfulness) == (ALL, 16, {}, True)
    assert plan.reductions == [] and plan.predicted_s == full


def test_reductions_come_in_order_and_fit():
    full = attribution_cost(ALL, 16, {}, UNIT, side=32)
    # a little short: cheaper settings only, every method and image kept
    a = fit_attribution(0.7 * full, ALL, 16, {}, UNIT, side=32)
    m1, n1, o1, r1, p1 = a.methods, a.n_images, a.options, a.reductions, a.predicted_s
    assert m1 == ALL and n1 == 16 and p1 <= 0.7 * full
    assert o1["integrated_gradients"]["n_steps"] == 8 and o1["smoothgrad"]["nt_samples"] == 4
    assert {r.setting for r in r1} == {"Integrated Gradients steps", "SmoothGrad samples", "GradientSHAP samples",
                                       "occlusion grid"}  # fmt: skip
    # much shorter: methods dropped in DROP_ORDER, the informative ones kept, then fewer images
    b = fit_attribution(0.5 * full, ALL, 16, {}, UNIT, side=32)  # a few methods dropped, least informative first
    dropped = [r.setting.removeprefix("method ") for r in b.reductions if r.setting.startswith("method ")]
    assert (
        dropped == ["guided_backprop", "input_x_gradient", "gradient_shap"] == [m for m in DROP_ORDER if m in ALL][:3]
    )
    assert b.n_images == 16 and b.faithfulness
    assert b.predicted_s <= 0.5 * full
    # shorter: every droppable method, then the games, then occlusion, then fewer images
    b = fit_attribution(0.15 * full, ALL, 16, {}, UNIT, side=32)
    m2, n2, r2, p2 = b.methods, b.n_images, b.reductions, b.predicted_s
    assert m2 == ["saliency", "integrated_gradients", "grad_cam"] and not b.faithfulness
    assert 4 <= n2 < 16 and p2 <= 0.15 * full
    images = next(r for r in r2 if r.setting == "images")
    assert (images.before, images.after) == (16, n2)
    assert f"{math.sqrt(16 / n2):.1f}x wider" in images.effect
    # nothing fits: the minimum is 4 images of the kept methods, never zero
    c = fit_attribution(0.0, ALL, 16, {}, UNIT, side=32)
    assert c.n_images == 4 and c.predicted_s > 0 and not c.faithfulness
    assert c.methods == ["saliency", "integrated_gradients", "grad_cam"]  # occlusion goes after the games
    settings = [r.setting for r in c.reductions]
    assert settings.index("deletion / insertion games") < settings.index("method occlusion") < settings.index("images")


def test_functional_reduces_steps_then_images():
    full = functional_cost(200, 100, 1, 4, 11, 2, UNIT)
    assert fit_functional(full, 200, 100, 1, 4, 11, 2, UNIT)[:3] == (11, None, [])
    steps, n, red, pred = fit_functional(0.6 * full, 200, 100, 1, 4, 11, 2, UNIT)
    assert steps == 5 and next(r.setting for r in red) == "interpolation steps"
    assert pred <= 0.6 * full or n == 32
    steps, n, red, pred = fit_functional(1.0, 200, 100, 1, 4, 11, 2, UNIT)
    assert (steps, n) == (3, 32)  # last of all: the barrier at the midpoint only, one row for the steps
    assert [(r.setting, r.before, r.after) for r in red if r.setting == "interpolation steps"] == [
        ("interpolation steps", 11, 3)
    ]
    # 32 images at 5 steps fit: the steps stay at 5
    at5 = functional_cost(32, 100, 1, 4, 5, 2, UNIT)
    assert fit_functional(at5, 200, 100, 1, 4, 11, 2, UNIT)[:2] == (5, 32)


def test_balanced_subset_spreads_over_classes():
    y = torch.tensor([0] * 30 + [1] * 10 + [2] * 5)
    ds = TensorDataset(torch.zeros(len(y), 1), y)
    sub = balanced_subset(ds, 12, seed=0)
    counts = pd.Series([int(sub[i][1]) for i in range(len(sub))]).value_counts().to_dict()
    assert counts == {0: 4, 1: 4, 2: 4}
    sub2 = balanced_subset(ds, 20, seed=0)  # class 2 runs out after 5: the others fill up
    assert len(sub2) == 20 and pd.Series([int(sub2[i][1]) for i in range(20)]).value_counts()[2] == 5
    assert balanced_subset(ds, None, 0) is ds and balanced_subset(ds, 100, 0) is ds
    assert list(balanced_subset(ds, 12, 0).indices) == list(sub.indices)  # seeded


def test_resolve_budget_and_pass_costs():
    assert resolve_budget("auto", torch.device("cpu")) == 120.0
    assert resolve_budget("auto", torch.device("cuda")) is None
    assert resolve_budget("none", torch.device("cpu")) is None and resolve_budget(30, torch.device("cpu")) == 30.0
    with pytest.raises(ValueError, match="positive"):
        resolve_budget(0, torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).train()
    ds = TensorDataset(torch.randn(5, 3, 2, 2), torch.zeros(5, dtype=torch.long))
    pc = measure_pass_costs(model, ds, torch.device("cpu"), batch=8)
    assert pc.batch == 5 and pc.forward_s > 0 and pc.backward_s > 0 and model.training


@pytest.mark.slow
def test_a_tiny_budget_is_reported_and_widens_the_findings(tmp_path):
    import torchvision
    from test_compare_cli import make_images, train_tuned

    from tunelens.cli import main

    data = make_images(tmp_path / "data", per_class=8)
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    torch.save(base.state_dict(), tmp_path / "base.pt")
    torch.save(train_tuned(base, data, 3).state_dict(), tmp_path / "tuned.pt")
    out = tmp_path / "out"
    argv = ["compare", "--arch", "resnet18", "--base", str(tmp_path / "base.pt"), "--tuned", str(tmp_path / "tuned.pt"),
            "--data", str(data), "--out", str(out), "--image-size", "32", "--no-progress", "--device", "cpu",
            "--budget", "0.5", "--set", "analysis.intruders=false"]  # fmt: skip
    assert main(argv) == 0
    s = json.loads((out / "results" / "summary.json").read_text())
    red = {(r["analysis"], r["setting"]): (r["before"], r["after"]) for r in s["budget"]["reduced"]}
    n_test = s["n_test"]
    assert red[("attribution", "images")] == (n_test, 4)
    assert red[("functional", "interpolation steps")] == (11, 3)  # at the 0.5 s budget every reduction is made
    assert ("attribution", "method guided_backprop") in red
    comp = pd.read_csv(out / "results" / "attribution_comparisons.csv")
    assert comp.groupby("method").size().eq(4).all() and "guided_backprop" not in set(comp["method"])
    assert len(pd.read_csv(out / "results" / "interpolation.csv")) == 3
    f = {x["id"]: x for x in s["findings"]}
    assert "budget_reduced" in f and "time budget of 0.5 s" in f["budget_reduced"]["text"]
    widened = [x for x in s["findings"] if "reduced by the time budget" in (x.get("uncertainty") or "")]
    assert widened and any("wider" in x["uncertainty"] for x in widened)
    html = (out / "report" / "index.html").read_text()
    assert "Reduced to fit the time budget" in html and "guided_backprop" in html


# ---- the weight analyses' costs, from matrix sizes and timed rates (issue 25, item 3)

from tunelens.analysis.engine.budget import LinalgRates, intruders_cost, weights_cost  # noqa: E402

RATES = LinalgRates(matmul64_s=1.0, matmul32_s=2.0, eigh64_s=3.0, eigvalsh32_s=5.0, entry_s=7.0)


def test_weights_cost_by_hand():
    # a 4 x 6 matrix: 24 entries x 7; Gram of the tall 6 x 4 side: 6 * 4^2 multiply-adds x 2; eigvalsh 4^3 x 5.
    # A vector of 5: its entries only. Two tuned models: twice.
    assert weights_cost([(4, 6), (5,)], 2, RATES, None) == 2 * ((24 * 7 + 6 * 16 * 2 + 64 * 5) + 5 * 7)
    # a conv kernel 8 x 2 x 3 x 3 is an 8 x 18 matrix
    assert weights_cost([(8, 2, 3, 3)], 1, RATES, None) == 144 * 7 + 18 * 64 * 2 + 512 * 5
    # above the exact size: randomized top-4 (12 probes): 6 products of 100 x 50 x 12, 6 QRs of 2 x 100 x 12^2,
    # the entries twice (the entry-wise work and the float32 copy)
    assert (
        weights_cost([(100, 50)], 1, RATES, 10, rank_k=4)
        == 6 * 100 * 50 * 12 * 2 + 6 * 2 * 100 * 144 * 2 + 2 * 5000 * 7
    )


def test_intruders_cost_by_hand():
    # 4 x 6 (wide): Gram 6 * 4^2 (float64), eigh 4^3 x 3, the entries x 7; the tuned side adds the cosines
    # (4 rows x k=2 x 4); one control adds its noise (4 entry passes)
    one = 6 * 16 * 1 + 64 * 3 + 24 * 7
    assert intruders_cost([(4, 6)], 1, 1, 2, RATES, None) == one + 2 * (one + 4 * 2 * 4) + 4 * 24 * 7
    # 6 x 4 (tall): the left vectors W V / S add 6 x 4 x 4
    tall = 6 * 16 + 64 * 3 + 24 * 7 + 6 * 4 * 4
    assert intruders_cost([(6, 4)], 1, 0, 2, RATES, None) == tall + (tall + 6 * 2 * 4)
    # the base alone (no tuned side): what a second tuned model does not pay again
    assert intruders_cost([(6, 4)], 0, 0, 2, RATES, None) == tall


def test_linalg_rates_are_positive_and_cached():
    from tunelens.analysis.engine.budget import measure_linalg_rates

    r = measure_linalg_rates(n=64, cached=False)
    assert all(v > 0 for v in vars(r).values())
    assert measure_linalg_rates() is measure_linalg_rates()


def test_smallest_plan_over_budget_is_said_at_the_start():
    from tunelens.analysis.engine.budget_plan import Budget

    lines: list[str] = []
    b = Budget(10.0, UNIT)
    b.plan(None, {"weights": 40.0, "intruders": 25.0, "evaluation": 1.0}, lines.append)  # type: ignore[arg-type]
    assert len(lines) == 1
    assert "smallest plan exceeds the time budget of 10 s" in lines[0] and "about 66 s" in lines[0]
    assert "weights 40 s" in lines[0] and "--budget 70" in lines[0]
    (caveat,) = b.caveat()
    assert "smallest plan exceeds" in caveat.text
    summary = b.summary({"weights": 41.0})
    assert summary["over_budget"] and summary["predicted"]["weights"] == 40.0 and summary["measured"]["weights"] == 41.0
    # the steps still to come are set aside before the budget sizes one
    assert b._rest("weights") == 26.0 and b._rest("evaluation") == 0.0
    quiet: list[str] = []
    Budget(1000.0, UNIT).plan(None, {"weights": 40.0}, quiet.append)  # type: ignore[arg-type]
    assert quiet == []


def test_smallest_attribution_plan_runs_integrated_gradients_on_4_steps():
    c = fit_attribution(0.0, ALL, 16, {}, UNIT, side=32)
    assert c.options["integrated_gradients"]["n_steps"] == 4
    (ig,) = [r for r in c.reductions if r.setting == "Integrated Gradients steps"]
    assert (ig.before, ig.after) == (16, 4)
    # only when 4 images at 8 steps do not fit
    at8 = attribution_cost(c.methods, 4, {"integrated_gradients": {"n_steps": 8}}, UNIT, 32, faithfulness=())
    plan = fit_attribution(at8, ALL, 16, {}, UNIT, side=32)
    assert plan.options["integrated_gradients"]["n_steps"] == 8 and plan.n_images == 4
