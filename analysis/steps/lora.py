"""LoRA next to full fine-tuning: did the low-rank fine-tune reach the full one's accuracy, and where do their
representations differ (minibatch linear CKA between the two tuned models, per stage, with a bootstrap CI)?

Runs when the tuned models include a LoRA fine-tune (strategy ``lora``, or a PEFT adapter given to compare)
and another tuned model to hold it against (the primary one, ``full`` by default).
"""

from __future__ import annotations

import pandas as pd

from tunelens.analysis import findings as F
from tunelens.analysis.engine.registry import Analysis, Context, Output, register
from tunelens.analysis.measures.cka_models import cka_matrix
from tunelens.analysis.measures.weights import EXACT_MAX_NUMEL, RANK_K
from tunelens.analysis.steps.evaluation import PREDICTIONS
from tunelens.analysis.steps.intruders import lora_models
from tunelens.analysis.steps.similarity import backbone_layers
from tunelens.analysis.steps.weights import WEIGHT_DELTAS
from tunelens.core.results import Results

CKA_LORA = "cka_lora"  # per LoRA model and stage: CKA with the reference (full) fine-tune


def run(ctx: Context) -> Output:
    lora = lora_models(ctx, ctx.tuned)
    ref = ctx.primary if ctx.primary not in lora else next((n for n in ctx.tuned if n not in lora), None)
    if not lora or ref is None:
        why = "no LoRA fine-tune among the tuned models" if not lora else "no non-LoRA tuned model to compare with"
        return Output(skipped={"lora_vs_full": why})
    rows = []
    for name in lora:
        layers = backbone_layers(ctx.models[ref], ctx.models[name])
        r = cka_matrix(
            ctx.models[ref],
            ctx.models[name],
            ctx.test_loader,
            layers=layers,
            pairs=[(n, n) for n in layers],
            device=ctx.device,
            seed=ctx.seed,
            names=(ref, name),
            n_examples=0,
        )
        d = r.diagonal.rename(columns={"layer_a": "layer"}).drop(columns=["layer_b"])
        d.insert(0, "model", name)
        d.insert(1, "reference", ref)
        rows.append(d)
    return Output(tables={CKA_LORA: pd.concat(rows, ignore_index=True)})


def _update_ranks(res: Results, name: str, ref: str) -> F.Finding | None:
    """Median stable / effective rank of the per-layer updates dW (weight_deltas) of the LoRA model and the reference."""
    wd = res.table(WEIGHT_DELTAS)
    if wd is None or wd.empty or "effective_rank" not in wd:
        return None
    w = wd[(wd["kind"] == "weight") & (wd["status"] == "compared") & (wd["stage"] != "head") & (wd["frobenius"] > 0)]
    med = {m: w[w["model"] == m][["stable_rank", "effective_rank"]].median() for m in (name, ref)}
    n = {m: int((w["model"] == m).sum()) for m in (name, ref)}
    if not n[name] or not n[ref]:
        return None
    return F.Finding(
        f"lora_rank_{name}",
        f"{name}'s weight updates are low-rank, as LoRA builds them: over its {n[name]} changed backbone matrices the "
        f"median update has stable rank {med[name]['stable_rank']:.1f} and effective rank "
        f"{med[name]['effective_rank']:.1f}, against {med[ref]['stable_rank']:.1f} and "
        f"{med[ref]['effective_rank']:.1f} for {ref} ({n[ref]} matrices).",
        WEIGHT_DELTAS,
        score=6.5,
        uncertainty=(
            "exact (SVD of each update, conv kernels as out x in*k*k)"
            if "rank_method" not in w or not w["rank_method"].astype(str).str.startswith("top").any()
            else f"SVD of each update, conv kernels as out x in*k*k; for matrices above {EXACT_MAX_NUMEL:,} entries the "
            f"top {RANK_K} singular values only (rank_method), so their effective rank is at most {RANK_K}"
        )
        + "; stable rank ||dW||_F^2/||dW||_2^2, effective rank exp(entropy of the normalised singular values)",
    )


def findings(res: Results) -> list[F.Finding]:
    cka = res.table(CKA_LORA)
    preds = res.table(PREDICTIONS)
    if cka is None or cka.empty:
        return []
    out = []
    for (name, ref), g in cka.groupby(["model", "reference"], sort=False):
        if preds is not None and {name, ref} <= set(preds["model"]):
            a = preds[preds.model == name].sort_values("index")["correct"].to_numpy()
            b = preds[preds.model == ref].sort_values("index")["correct"].to_numpy()
            d, lo, hi = F.paired_bootstrap_diff(a, b, seed=5)
            verdict = (
                f"{name} reached the {ref} fine-tune's target accuracy"
                if lo <= 0 <= hi
                else (f"{name} beat the {ref} fine-tune" if lo > 0 else f"{name} fell short of the {ref} fine-tune")
            )
            out.append(
                F.Finding(
                    f"lora_accuracy_{name}",
                    f"{verdict}: {F.pct(a.mean())} against {F.pct(b.mean())} target "
                    f"test accuracy ({100 * d:+.1f} points).",
                    "strategies",
                    score=9.5,
                    uncertainty=f"95% CI of the difference {F.span(lo, hi, '+.1f', 100)} points (paired "
                    f"bootstrap over {len(a)} test {F.units()})",
                )
            )
        rk = _update_ranks(res, name, ref)
        if rk is not None:
            out.append(rk)
        g = g.dropna(subset=["cka"])
        if g.empty:
            continue
        low = g.loc[g["cka"].idxmin()]
        high = g.loc[g["cka"].idxmax()]
        out.append(
            F.Finding(
                f"lora_cka_{name}",
                f"Inside the network, {name} and {ref} are most alike at {high['layer']} (CKA {high['cka']:.2f}) and "
                f"differ most at {low['layer']} (CKA {low['cka']:.2f}, 95% CI {F.span(low['ci_low'], low['ci_high'])}): "
                + (
                    "the two fine-tunes built nearly the same representations throughout."
                    if low["cka"] >= 0.9
                    else f"the two fine-tunes reach their answers through different features, most of all at {low['layer']}."
                ),
                CKA_LORA,
                score=8.4,
                uncertainty=f"{low['estimator']}; CI: bootstrap over {int(low['n_batches'])} test batches",
            )
        )
    return out


ANALYSIS = register(
    Analysis(
        name="lora_vs_full",
        title="LoRA next to full fine-tuning",
        order=25,
        tables=(CKA_LORA,),
        run=run,
        findings=findings,
    )
)
