"""The time budget during one run of the suite: measure the pass costs, resize the costly analyses just
before they run, mark the findings they produce, and say what was reduced (formulas in :mod:`.budget`).

Every analysis has a predicted cost (its ``cost``: passes from the timed pass costs, the weight analyses from
their matrix sizes and the timed rates of :class:`~.budget.LinalgRates`). The analyses whose size is not a
choice (evaluation, weight deltas, intruders, CKA, ...) run as configured; the seconds left after them (the
predicted seconds of those still to come are set aside) are shared between the attribution study and the
interventions in proportion to their predicted cost at the configured settings. When even the smallest plan
(every reduction made) exceeds the budget, the run says so at the start, with how long it will take, and the
report carries it (:meth:`Budget.plan`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from torch import nn

from tunelens.analysis import findings as F
from tunelens.analysis.engine.budget import (
    PassCosts,
    Reduction,
    attribution_cost,
    fit_attribution,
    fit_functional,
    functional_cost,
    measure_linalg_rates,
    measure_pass_costs,
    resolve_budget,
)
from tunelens.analysis.engine.registry import Context, get
from tunelens.analysis.measures.attribution.methods import choose_methods
from tunelens.core.text import is_text_model

__all__ = ["Budget", "attribution_inputs", "functional_shape"]


def functional_shape(ctx: Context) -> dict[str, Any]:
    """The sizes the interventions' cost depends on (:func:`~.budget.functional_cost`'s arguments)."""
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in ctx.base.modules())
    return {
        "batchnorm": bn,
        "n_test": len(ctx.data["test"]),
        "n_train": len(ctx.data["train"]),
        "n_tuned": len(ctx.tuned),
        "n_stages": len(ctx.stage_map.stages),
        "steps": int(ctx.settings["interpolation_steps"]),
        "n_probe_models": 2 + ("scratch" in ctx.models),
    }


def attribution_inputs(ctx: Context) -> tuple[list[str], int, dict, int]:
    """Methods, images, method options and image side of the attribution study as configured now."""
    meths, _ = choose_methods(str(ctx.settings.get("attribution_methods", "default")), lambda: ctx.stage_map)
    n = min(int(ctx.settings["attribution_images"]), len(ctx.data["test"]))
    opts = dict(ctx.settings.get("attribution_options") or {})
    return meths, n, opts, int(ctx.data["test"][0][0].shape[-1])


class Budget:
    """State of the budget over one :func:`~tunelens.analysis.suite.analyze_models` call."""

    def __init__(self, seconds: float | None, costs: PassCosts | None = None, why_off: str = "") -> None:
        self.seconds, self.costs, self.why_off = seconds, costs, why_off
        self.t0 = time.perf_counter()
        self.reduced: list[Reduction] = []
        self.predicted: dict[str, float] = {}
        self.order: list[str] = []  # the analyses of this run, in run order (plan)
        self.smallest: dict[str, float] = {}  # predicted seconds of each at its smallest plan
        self.over = ""  # what the run says when the smallest plan exceeds the budget

    @classmethod
    def start(cls, ctx: Context, log: Callable[[str], None] = print) -> Budget:
        """The budget of ``ctx.settings['budget']`` (``auto``: :data:`~.budget.CPU_DEFAULT_S` on a CPU, none on CUDA), its pass costs
        measured on the base model (their time counts against the budget)."""
        t0 = time.perf_counter()
        seconds = resolve_budget(ctx.settings.get("budget", "auto"), ctx.device)
        if seconds is None:
            return cls(None, why_off="no time budget (analysis.budget = none, or auto on CUDA)")
        if is_text_model(ctx.base):
            return cls(None, why_off="the time budget applies to image models; text analyses ran as configured")
        costs = measure_pass_costs(ctx.base, ctx.data["test"], ctx.device, batch=min(8, len(ctx.data["test"])))
        costs = dataclasses.replace(costs, linalg=measure_linalg_rates())
        b = cls(seconds, costs)
        b.t0 = t0
        log(
            f"[analyze] budget {seconds:g}s: one image costs {1e3 * costs.forward_s:.1f} ms forward, "
            f"{1e3 * costs.backward_s:.1f} ms forward + backward"
        )
        return b

    @property
    def active(self) -> bool:
        return self.seconds is not None and self.costs is not None

    def left(self) -> float:
        assert self.seconds is not None
        return self.seconds - (time.perf_counter() - self.t0)

    def _functional_cost(self, ctx: Context, steps: int | None = None, n_test: int | None = None) -> float:
        assert self.costs is not None
        shape = functional_shape(ctx)
        shape.update({k: v for k, v in (("steps", steps), ("n_test", n_test)) if v is not None})
        return functional_cost(costs=self.costs, **shape)

    def predictions(self, ctx: Context, names: list[str]) -> dict[str, float]:
        """Predicted seconds of each analysis in ``names`` at the configured settings (for the progress line):
        each analysis's own ``cost`` (:class:`~tunelens.analysis.engine.registry.Analysis`; none declared: a
        forward pass per model and test image); its ``relative_cost`` when no pass was timed."""
        if not self.active:
            return {n: get(n).relative_cost for n in names}
        assert self.costs is not None
        n_test, n_models = len(ctx.data["test"]), len(ctx.models)
        per_pass = n_models * n_test * self.costs.forward_s
        out = {}
        for n in names:
            cost = get(n).cost
            out[n] = cost(ctx, self.costs) if cost is not None else per_pass
        return out

    def plan(self, ctx: Context, predicted: dict[str, float], log: Callable[[str], None] = print) -> None:
        """Take the analyses of this run (``predicted``: their seconds at the configured settings, in run order),
        find the smallest plan (attribution and interventions at every reduction, the others as predicted) and,
        when it cannot fit the seconds left, say so now (one line through ``log``; :meth:`caveat` repeats it)."""
        if not self.active:
            return
        assert self.costs is not None and self.seconds is not None
        self.order = list(predicted)
        self.predicted = dict(predicted)
        for n, p in predicted.items():
            if n == "attribution":
                meths, k, opts, side = attribution_inputs(ctx)
                p = fit_attribution(0.0, meths, k, opts, self.costs, side).predicted_s
            elif n == "functional":
                p = fit_functional(0.0, costs=self.costs, **functional_shape(ctx))[3]
            self.smallest[n] = p
        spent = self.seconds - self.left()
        least = spent + sum(self.smallest.values())
        if least <= self.seconds:
            return
        top = sorted(self.smallest.items(), key=lambda kv: -kv[1])[:3]
        self.over = (
            f"even the smallest plan exceeds the time budget of {self.seconds:g} s: the analyses will take about "
            f"{least:.0f} s (most: " + ", ".join(f"{n} {v:.0f} s" for n, v in top) + "), at their smallest "
            f"settings; --budget {math.ceil(least / 10) * 10} or more would let them run larger"
        )
        log(f"[analyze] {self.over}")

    def _rest(self, name: str) -> float:
        """Predicted seconds of the analyses after ``name`` whose size the budget does not choose."""
        after = self.order[self.order.index(name) + 1 :] if name in self.order else []
        return sum(self.predicted.get(n, 0.0) for n in after if n not in ("attribution", "functional"))

    def fit(self, name: str, ctx: Context) -> None:
        """Resize analysis ``name`` (``attribution`` or ``functional``) in ``ctx.settings`` to the seconds left."""
        if not self.active or name not in ("attribution", "functional"):
            return
        assert self.costs is not None
        s: dict[str, Any] = ctx.settings  # type: ignore[assignment]  # the suite's own copy
        left = max(0.0, self.left() - self._rest(name))
        if name == "attribution":
            meths, n, opts, side = attribution_inputs(ctx)
            full = attribution_cost(meths, n, opts, self.costs, side)
            rest = self._functional_cost(ctx) if s.get("functional", True) else 0.0
            share = left * full / (full + rest) if full + rest > 0 else left
            if rest > 0:  # leave the interventions at least their smallest plan (3 steps, 32 test images)
                least = self._functional_cost(ctx, steps=min(3, int(s["interpolation_steps"])),
                                              n_test=min(32, len(ctx.data["test"])))  # fmt: skip
                share = max(0.0, min(share, left - least))
            plan = fit_attribution(share, meths, n, opts, self.costs, side)
            if plan.reductions:
                s["attribution_images"] = plan.n_images
                s["attribution_methods"] = ",".join(plan.methods)
                s["attribution_options"] = plan.options
                s["attribution_faithfulness"] = plan.faithfulness
            self.reduced += plan.reductions
            self.predicted["attribution"] = plan.predicted_s
        else:
            steps, n_test, red, pred = fit_functional(left, costs=self.costs, **functional_shape(ctx))
            if red:
                s["interpolation_steps"] = steps
                s["functional_images"] = n_test
            self.reduced += red
            self.predicted["functional"] = pred

    def mark(self, name: str, findings: list[F.Finding]) -> list[F.Finding]:
        """``findings`` of analysis ``name`` with its reductions added to their uncertainty."""
        red = [r for r in self.reduced if r.analysis == name]
        if not red:
            return findings
        note = "reduced by the time budget: " + "; ".join(f"{r.setting} {r.before} -> {r.after}" for r in red)
        effects = [r.effect for r in red if "wider" in r.effect or "less certain" in r.effect]
        if effects:
            note += " (" + "; ".join(effects) + ")"
        return [
            dataclasses.replace(f, uncertainty=f"{f.uncertainty}; {note}" if f.uncertainty else note) for f in findings
        ]

    def caveat(self) -> list[F.Finding]:
        """One caveat finding listing what the budget reduced (none when nothing was), and whether even the
        smallest plan exceeded the budget."""
        if not self.reduced and not self.over:
            return []
        what = "; ".join(f"{r.analysis}: {r.setting} {r.before} -> {r.after}" for r in self.reduced)
        over = f" Note: {self.over}." if self.over else ""
        return [
            F.Finding(
                "budget_reduced",
                f"Caveat: to fit the time budget of {self.seconds:g} s (--budget), some analyses ran smaller: "
                f"{what or 'nothing could be reduced'}.{over} The findings of those analyses carry the wider "
                "uncertainty; run with a larger --budget (or --budget none) for the full analysis.",
                "methods",  # the report's methods section lists the reductions
                score=90,
                kind="caveat",
            )
        ]

    def summary(self, timings: dict[str, float]) -> dict[str, Any]:
        """What the report's methods section shows: the budget, the pass costs, predicted and measured seconds
        of the resized analyses, and every reduction."""
        return {
            "seconds": self.seconds,
            "note": self.why_off,
            "pass_costs": self.costs.to_dict() if self.costs else None,
            "linalg_rates": asdict(self.costs.linalg) if self.costs and self.costs.linalg else None,
            "predicted": {k: round(v, 2) for k, v in self.predicted.items()},
            "smallest_plan": {k: round(v, 2) for k, v in self.smallest.items()},
            "over_budget": self.over,
            "measured": {k: round(timings[k], 2) for k in self.predicted if k in timings},
            "reduced": [r.to_dict() for r in self.reduced],
        }
