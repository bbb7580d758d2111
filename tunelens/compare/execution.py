"""``tunelens compare``'s run of a validated :class:`~tunelens.compare.plan.Plan`: the analyses (or, when the
weights are not finite, the tuned models' accuracy only), the results folder and the report; the command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tunelens.compare.flags import add_parser
from tunelens.compare.plan import CompareError, Plan, finding, one_line
from tunelens.compare.validation import validate

__all__ = ["execute", "main", "run"]


def _minimal_results(plan: Plan, tuned_ok: list[str], why: str):
    """Results without the base-vs-tuned analyses (the base weights are not finite): tuned accuracy only."""
    import pandas as pd
    from torch.utils.data import DataLoader

    from tunelens.analysis.suite import predictions_table
    from tunelens.core.results import Results

    res = Results()
    res.summary.update(timings={}, skipped={}, findings=[], primary=plan.cfg["analysis"]["primary"], tuned=tuned_ok)
    if tuned_ok:
        loader = DataLoader(plan.test, batch_size=plan.cfg["analysis"]["batch_size"], shuffle=False)
        preds = predictions_table({n: plan.models[n] for n in tuned_ok}, loader, plan.device)
        acc = (
            preds.groupby("model", sort=False)
            .agg(acc=("correct", "mean"), loss=("loss", "mean"), n=("correct", "size"))
            .reset_index()
        )
        acc["role"], acc["strategy"], acc["train_seconds"] = "tuned", "external", None
        res.tables["predictions"], res.tables["accuracy"] = preds, acc
    else:
        res.tables["accuracy"] = pd.DataFrame(
            columns=["model", "acc", "loss", "n", "role", "strategy", "train_seconds"]
        )
    from tunelens.analysis.engine.registry import registered

    for a in registered():
        if a.compares_models:
            res.summary["skipped"][a.name] = why
    return res


def execute(plan: Plan, log=print) -> Path:
    """Run the analyses and render the report of a validated :class:`Plan`; returns the report's path.

    With ``plan.progress``, one line shows the whole run (:mod:`tunelens.core.progress`): the analyses'
    share is predicted from timed passes once the first batch has run, the report's from the default run."""
    from tunelens.core.progress import run_progress

    with run_progress({"analyze": 60.0, "report": 12.0}, enabled=plan.progress, title="tunelens compare") as line:
        return _execute(plan, line.write if plan.progress else log)


def _execute(plan: Plan, log=print) -> Path:
    from tunelens.analysis.suite import analyze_models
    from tunelens.config import config_hash
    from tunelens.core import runtime
    from tunelens.core.files import versions
    from tunelens.core.progress import report as report_stage
    from tunelens.pipeline import random_like
    from tunelens.reports.render import render_report

    t0 = time.perf_counter()
    runtime.set_determinism(plan.cfg["seed"])
    for m in plan.models.values():
        m.to(plan.device).eval()
    names = [n for n in plan.models if n != "base"]
    bad = plan.nonfinite
    extra_findings: list[dict] = []
    for name, keys in bad.items():
        shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        consequence = (
            "no analysis that compares it with a tuned model can run"
            if name == "base"
            else "it was left out of every analysis"
        )
        extra_findings.append(
            finding(
                f"nonfinite_{name}",
                f"The weights of {'the base model' if name == 'base' else name} contain NaN or "
                f"infinite values in {len(keys)} tensor(s): {shown}. The model is broken ({consequence}); check the "
                "training run that wrote it (a diverged loss, a bad learning rate, mixed precision overflow).",
                "accuracy",
                score=50,
                kind="result",
                uncertainty="exact (read from the weights)",
            )
        )
    tuned_ok = [n for n in names if n not in bad]
    data = {"train": plan.train, "test": plan.test, **plan.source}
    skipped_extra: dict[str, str] = {}
    if "base" in bad or not tuned_ok:
        who = "the base model" if "base" in bad else "every tuned model"
        why = f"the weights of {who} contain NaN or infinite values (see the findings)"
        log(f"[compare] {why}: only the evaluation of the finite tuned models runs")
        res = _minimal_results(plan, tuned_ok, why)
    else:
        models = {"base": plan.models["base"], **{n: plan.models[n] for n in tuned_ok}}
        mans = {n: plan.manifests[n] for n in models}
        for n in names:
            if n in bad:
                skipped_extra[f"analyses of {n}"] = "its weights contain NaN or infinite values (see the findings)"
        log(
            f"[compare] analysing base + {', '.join(tuned_ok)} on {len(plan.train)} training and "
            f"{len(plan.test)} test {'sentences' if plan.cfg.get('modality') == 'text' else 'images'} ({plan.device})"
        )
        with runtime.no_tf32():
            res = analyze_models(
                models,
                mans,
                data,
                plan.cfg["analysis"],
                device=plan.device,
                seed=plan.cfg["seed"],
                log=log,
                progress=plan.progress,
                random_like=random_like(plan.manifests["base"]),
            )
    t_an = time.perf_counter() - t0

    s = res.summary
    plan.failed = dict(s.get("failed", {}))
    skipped = s.setdefault("skipped", {})
    skipped.update(skipped_extra)
    skipped.setdefault(
        "training curves",
        "external checkpoints carry no training history (curves, per-stage "
        "update ratios); models fine-tuned by tunelens have them",
    )
    if not plan.dataset.has_masks and not any("mask" in k.lower() or "local" in k.lower() for k in skipped):
        skipped["localisation"] = plan.no_localisation or (
            "no ground-truth masks were given (--masks CSV with per-image masks or boxes), "
            "so attributions are not scored against the objects"
        )
    findings = list(s.get("findings", [])) + extra_findings + plan.findings
    for i, note in enumerate(plan.notes):
        findings.append(finding(f"compare_note_{i}", note, "accuracy", score=0.5))
    s["findings"] = sorted(findings, key=lambda f: -(f.get("score") or 0))
    s["notes"] = list(plan.notes)
    s["nonfinite"] = {n: k for n, k in bad.items()}
    ds = plan.dataset
    s.update(
        key=config_hash("compare", plan.cfg, {n: m["sha256"] for n, m in sorted(plan.manifests.items())}),
        config=plan.cfg,
        versions=versions(),
        external=True,
        checkpoints={
            n: {
                "file": m["file"],
                "sha256": m["sha256"],
                "strategy": m["strategy"],
                "seed": None,
                "train_seconds": None,
            }
            for n, m in plan.manifests.items()
        },
        data=plan.data_summary
        or {
            "description": f"your images ({ds.describe()}).",
            "classes": list(ds.classes),
            "image_size": "x".join(map(str, ds.image_size)),
            "n_train": len(plan.train),
            "n_test": len(plan.test),
            "folder": str(ds.root),
            "has_masks": ds.has_masks,
        },
        base_description=plan.base_description,
    )
    s.setdefault("timings", {})
    s["timings"]["analyze_total"] = t_an
    for name in [n for n, df in res.tables.items() if len(df.columns) == 0]:
        del res.tables[name]  # e.g. training curves: an empty CSV has no header and cannot be read back
    res_dir = plan.out / "results"
    res.save(res_dir)
    t = time.perf_counter()
    report_stage("analyze")
    path = render_report(res_dir, plan.out / "report", title="tunelens report: your checkpoints")
    report_stage("report")
    log(f"[compare] analysed in {t_an:.1f}s, report rendered in {time.perf_counter() - t:.1f}s")
    return path


def run(args: argparse.Namespace) -> int:
    """The ``compare`` command: 0 on success (the report's path is the last line), 2 on bad input."""
    from tunelens.core.out_lock import OutInUseError, out_lock

    try:
        plan = validate(args)
        with out_lock(plan.out):
            path = execute(plan)
    except (CompareError, OutInUseError) as e:
        print(f"tunelens: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    if plan.failed:
        print(
            f"tunelens: {len(plan.failed)} analysis step(s) failed ({', '.join(plan.failed)}); the report lists "
            "them with their errors and holds everything that succeeded",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tunelens.compare ...`` (the same as ``tunelens compare ...``)."""
    ap = argparse.ArgumentParser(prog="tunelens")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    return run(ap.parse_args(["compare", *(sys.argv[1:] if argv is None else argv)]))
