"""The analyze stage: every registered analysis over one base model and its tuned models.

``analyze_models`` takes models and data (not files), so it serves the default run and users'
own checkpoints alike, and returns a :class:`~tunelens.core.results.Results` (tables + arrays +
summary with ranked findings). It loops over :func:`tunelens.analysis.engine.registry.registered`: an
analysis switched off is listed in ``summary["skipped"]`` with the reason, and one that raises is
recorded in ``summary["failed"]`` (its error in one line) while the others go on.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tunelens.analysis import findings as F
from tunelens.analysis.engine.budget_plan import Budget
from tunelens.analysis.engine.registry import Context, registered
from tunelens.analysis.steps.evaluation import predictions_table, training_tables
from tunelens.core import progress as run_line
from tunelens.core.models import fast_layout
from tunelens.core.results import Results
from tunelens.core.text import is_text_model

__all__ = ["analyze_models", "one_line_error", "predictions_table", "training_tables"]


def one_line_error(e: BaseException) -> str:
    """``Type: message`` on one line (for the report and the log)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


def _fast_or_none(model: nn.Module | None, device: torch.device) -> nn.Module | None:
    return fast_layout(model, device) if model is not None else None


def analyze_models(
    models: Mapping[str, nn.Module],
    manifests: Mapping[str, Mapping[str, Any]],
    data: Mapping[str, Any],
    settings: Mapping[str, Any],
    *,
    device: torch.device,
    seed: int = 0,
    log: Callable[[str], None] = print,
    progress: bool = True,
    random_like: Callable[[int], nn.Module] | None = None,
    only: Mapping[str, str] | None = None,
) -> Results:
    """Run every registered analysis.

    ``models`` holds ``base``, the tuned models and optionally ``scratch``; ``manifests`` gives each its
    ``role`` (``base``, ``tuned``, ``control``), ``strategy`` and training facts; ``data`` holds the target
    task's ``train`` and ``test`` splits (items ``(x, y[, mask])``); ``settings`` is the flat ``analysis``
    section of the configuration (:func:`tunelens.analysis.engine.registry.analysis_defaults`). ``only``: analyses
    to skip, with the reason (``{name: why}``)."""
    if isinstance(settings.get("analysis"), Mapping):  # the whole configuration, as README 0.1 showed
        warnings.warn(
            "analyze_models(models, manifests, data, cfg) with the whole configuration is deprecated: pass "
            "cfg['analysis'] and seed=cfg['seed']",
            DeprecationWarning,
            stacklevel=2,
        )
        seed = int(settings.get("seed", seed))
        settings = settings["analysis"]
    settings = dict(settings)  # the budget may reduce some settings of this run
    res = Results()
    timings: dict[str, float] = {}
    skipped: dict[str, str] = dict(only or {})
    failed: dict[str, str] = {}
    tuned = [n for n, m in manifests.items() if m.get("role") == "tuned"]
    primary = str(settings.get("primary", "full"))
    if primary not in tuned:
        primary = tuned[0]
    res.summary.update(primary=primary, tuned=tuned)
    if hasattr(data.get("test"), "__len__"):
        res.summary["n_test"] = len(data["test"])
    progress = progress and not run_line.active()  # a run's progress line replaces the analyses' own bars
    # channels-last copies where that layout is faster (BatchNorm convnets on the CPU: 1.2-1.8x per pass)
    fast = {n: fast_layout(m, device) for n, m in models.items()}
    make_random: Callable[[int], nn.Module | None] | None = random_like
    if any(fast[n] is not models[n] for n in models):
        res.summary["layout"] = "channels_last"
        if random_like is not None:
            make = random_like
            make_random = lambda seed: _fast_or_none(make(seed), device)
    ctx = Context(
        models=fast,
        manifests=manifests,
        data=data,
        settings=settings,
        device=device,
        seed=seed,
        primary=primary,
        tuned=tuned,
        progress=progress,
        log=log,
        results=res,
        random_like=make_random,
    )
    try:  # the stages every analysis groups by, shown in the report's methods section
        res.summary["stages"] = ctx.stage_map.to_dict()
    except Exception as e:
        failed["stages"] = one_line_error(e)
        log(f"[analyze] finding the stages failed: {failed['stages']}")
    try:
        budget = Budget.start(ctx, log)
    except Exception as e:  # timing a batch failed: the analyses run as configured, and the report says why
        failed["budget"] = one_line_error(e)
        budget = Budget(None, why_off=f"the time budget could not time a batch ({failed['budget']})")
    to_run = []
    for a in registered():
        if a.name in skipped:
            continue
        if a.optional and not settings.get(a.name, True):
            skipped[a.name] = f"disabled in the configuration (analysis.{a.name} = false)"
            continue
        to_run.append(a)
    try:  # the run's progress line: each analysis's share of the stage, by its predicted seconds
        weights = budget.predictions(ctx, [a.name for a in to_run])
    except Exception:
        weights = {a.name: 1.0 for a in to_run}
    try:  # every analysis counted; says at once when even the smallest plan cannot fit
        budget.plan(ctx, weights, log)
    except Exception as e:
        failed["budget (plan)"] = one_line_error(e)
    if budget.active:
        run_line.replan("analyze", sum(weights.values()))
    total_w, done_w = max(sum(weights.values()), 1e-9), 0.0
    done = []
    for a in to_run:
        run_line.report("analyze", done_w / total_w, label=a.name)
        try:
            budget.fit(a.name, ctx)
        except Exception as e:  # a failed prediction never stops the analysis: it runs as configured
            failed[f"budget ({a.name})"] = one_line_error(e)
        t = time.perf_counter()
        try:
            out = a.run(ctx)
        except Exception as e:  # one failing analysis never loses the others
            failed[a.name] = one_line_error(e)
            log(f"[analyze] {a.name} failed: {failed[a.name]}")
            if os.environ.get("TUNELENS_DEBUG"):
                traceback.print_exc()
            continue
        finally:
            timings[a.name] = time.perf_counter() - t
            done_w += weights.get(a.name, 0.0)
            run_line.report("analyze", done_w / total_w, label=a.name)
        res.tables.update(out.tables)
        res.arrays.update({k: dict(v) for k, v in out.arrays.items()})
        res.summary.update(out.summary)
        if out.notes:
            res.summary.setdefault("notes", []).extend(out.notes)
        skipped.update(out.skipped)
        done.append(a)
    findings: list[F.Finding] = []
    modality = "text" if is_text_model(models["base"]) else "image"
    res.summary.setdefault("modality", modality)
    with F.modality_words(modality):
        for a in done:
            try:
                findings += budget.mark(a.name, a.findings(res))
            except Exception as e:
                failed[f"{a.name} findings"] = one_line_error(e)
        findings = F.small_data_caveat(findings, res.summary.get("n_test")) + budget.caveat()
    res.summary["budget"] = budget.summary(timings)
    res.summary.update(timings=timings, skipped=skipped, failed=failed, findings=F.rank_findings(findings))
    return res
