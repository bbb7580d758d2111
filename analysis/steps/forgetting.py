"""Forgetting: how much of the source task each tuned backbone kept, and which stages, rewound, restore it.

Two measures on the source task's test split, each against the base (Kirkpatrick et al. 2017 name the
effect catastrophic forgetting; Kumar et al. 2022 measure feature distortion the same way):

* **head accuracy**: the tuned backbone under the *base* head (the source classifier), i.e. the tuned
  model with its head swapped back. ``drop = acc(base) - acc(tuned backbone + base head)``;
  95% CI by a paired bootstrap over the source test images.
* **probe accuracy**: a logistic-regression probe fitted on each backbone's pooled features of the source
  training split (standardised, ``C = 1``; :func:`tunelens.analysis.measures.probes.fit_probe`'s recipe), scored on
  the source test split: what is still *linearly decodable*, however the head reads it.

Rewind (:func:`tunelens.analysis.measures.interventions.rewind` on the source task): each stage of the tuned backbone
set back to its pretrained weights, BatchNorm statistics included, under the base head; ``restored`` is the
source accuracy won back, ``share_restored`` its fraction of the drop.

Needs ``data["source_train"]`` and ``data["source_test"]`` (the default run generates them; ``compare``
passes ``--source-data``); skipped with the reason otherwise.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from tunelens.analysis import findings as F
from tunelens.analysis.engine.registry import Analysis, Context, Output, register
from tunelens.analysis.engine.sharding import shard_loader
from tunelens.analysis.measures.interventions import rewind
from tunelens.analysis.measures.layers import resolve_layers
from tunelens.analysis.measures.probes import layer_features
from tunelens.analysis.steps.evaluation import predictions_table
from tunelens.core.naming import head_name
from tunelens.core.results import Results
from tunelens.core.runtime import blas_threads
from tunelens.core.text import is_text_model

FORGETTING = "forgetting"
FORGETTING_REWIND = "forgetting_rewind"
FORGETTING_PER_IMAGE = "forgetting_per_image"  # per model and source test image: head and probe correctness


def with_base_head(base: nn.Module, tuned: nn.Module) -> nn.Module:
    """A copy of ``tuned`` whose head is (a copy of) the base's: the tuned backbone read by the source classifier."""
    model = copy.deepcopy(tuned)
    name = head_name(model)
    parent, _, leaf = name.rpartition(".")
    (model.get_submodule(parent) if parent else model).add_module(leaf, copy.deepcopy(base.get_submodule(name)))
    return model.eval()


def pooled_layer(model: nn.Module) -> str:
    """The layer that feeds the head (``avgpool`` for ResNets): the last ``auto`` layer that is not the head."""
    head = head_name(model)
    layers = [n for n in resolve_layers(model, "auto") if n != head and not n.startswith(head + ".")]
    return layers[-1]


def probe_correct(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per test image, whether a standardised logistic-regression probe (C=1, lbfgs) fitted on train is right."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    with warnings.catch_warnings(), blas_threads(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(sc.transform(xtr), ytr)
    return (clf.predict(sc.transform(xte)) == yte).astype(int)


def _ci(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[float, float, float]:
    return F.paired_bootstrap_diff(a, b, seed=seed)


def run(ctx: Context) -> Output:
    if "source_test" not in ctx.data or "source_train" not in ctx.data:
        pre = (ctx.manifests.get("base") or {}).get("pretrained")
        if pre:  # real pretrained weights (the ImageNet preset): their task's data is not at hand
            why = (
                f"no source-task data: the base is {pre.get('description') or 'real pretrained weights'}, "
                "and tunelens has none of the data those weights were trained on"
            )
        else:
            why = (
                "no source-task data (tunelens run generates it; for compare pass --source-data, "
                + ("a CSV" if is_text_model(ctx.base) else "an ImageFolder")
                + " of the task the base was trained on)"
            )
        return Output(skipped={"forgetting": why})
    base = ctx.base
    src_test = shard_loader(ctx.data["source_test"], 256, device=ctx.device)
    src_train = shard_loader(ctx.data["source_train"], 256, device=ctx.device)
    hybrids = {"base": base, **{n: with_base_head(base, ctx.models[n]) for n in ctx.tuned}}
    preds = predictions_table(hybrids, src_test, ctx.device)
    layer = pooled_layer(base)
    per_image, rows, rw = [], [], []
    probe: dict[str, np.ndarray] = {}
    for name, m in hybrids.items():
        xtr, ytr = layer_features(m, src_train, [layer], ctx.device)
        xte, yte = layer_features(m, src_test, [layer], ctx.device)
        probe[name] = probe_correct(xtr[layer], ytr, xte[layer], yte, seed=ctx.seed)
        head = preds[preds["model"] == name].sort_values("index")["correct"].to_numpy()
        per_image.append(
            pd.DataFrame({"model": name, "index": np.arange(len(head)), "head": head, "probe": probe[name]})
        )
    pi = pd.concat(per_image, ignore_index=True)
    ref = pi[pi["model"] == "base"]
    for i, name in enumerate(ctx.tuned):
        g = pi[pi["model"] == name]
        row: dict[str, Any] = {
            "model": name,
            "strategy": ctx.manifests[name].get("strategy"),
            "layer": layer,
            "n": len(g),
        }
        for what in ("head", "probe"):
            d, lo, hi = _ci(ref[what].to_numpy(), g[what].to_numpy(), seed=ctx.seed + i)
            row.update(
                {
                    f"{what}_acc_base": float(ref[what].mean()),
                    f"{what}_acc": float(g[what].mean()),
                    f"{what}_drop": d,
                    f"{what}_drop_lo": lo,
                    f"{what}_drop_hi": hi,
                }
            )
        rows.append(row)
        if row["head_drop"] <= 0:
            continue  # nothing forgotten under the base head: nothing to restore
        r = rewind(base, hybrids[name], src_test, device=ctx.device).table
        r = r[r["group"] != "none"]
        rw.append(
            pd.DataFrame(
                {
                    "model": name,
                    "group": r["group"],
                    "source_acc": r["acc"],
                    "restored": -r["acc_drop"],
                    "share_restored": -r["acc_drop"] / row["head_drop"],
                    "drop": row["head_drop"],
                    "n": r["n"],
                }
            )
        )
    tables = {FORGETTING: pd.DataFrame(rows), FORGETTING_PER_IMAGE: pi}
    if rw:
        tables[FORGETTING_REWIND] = pd.concat(rw, ignore_index=True)
    return Output(tables=tables)


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def findings(res: Results) -> list[F.Finding]:
    fg = res.table(FORGETTING)
    if fg is None or fg.empty:
        return []
    out = []
    primary = res.summary.get("primary", "full")
    n = int(fg["n"].iloc[0])
    for _, r in fg.iterrows():
        sig = r["head_drop_lo"] > 0
        txt = (
            f"{r['model']} {'forgot part of' if sig else 'kept'} the source task: its backbone under the base head "
            f"scores {F.pct(r['head_acc'])} on the source test set against the base's {F.pct(r['head_acc_base'])} "
            f"(drop {_pts(r['head_drop'])} points); a linear probe on its pooled features reaches "
            f"{F.pct(r['probe_acc'])} against {F.pct(r['probe_acc_base'])} (drop {_pts(r['probe_drop'])} points)"
        )
        rw = res.table(FORGETTING_REWIND)
        if rw is not None and sig:
            g = rw[(rw["model"] == r["model"]) & (rw["group"] != "all_but_head")]
            if len(g):
                top = g.loc[g["restored"].idxmax()]
                txt += (
                    f"; rewinding {top['group']} alone restores {_pts(top['restored'])} of those points "
                    f"({F.pct(min(max(top['share_restored'], 0), 9.99), 0)})"
                )
        out.append(
            F.Finding(
                f"forgetting_{r['model']}",
                txt + ".",
                FORGETTING,
                score=(7 if r["model"] == primary or r["strategy"] == "lora" else 4) + max(r["head_drop"], 0) * 5,
                uncertainty=f"95% CI of the drop under the base head {F.span(r['head_drop_lo'], r['head_drop_hi'], '.1f', 100)} "
                f"points, of the probe drop {F.span(r['probe_drop_lo'], r['probe_drop_hi'], '.1f', 100)} (paired bootstrap over {n} source test {F.units()})",
            )
        )
    pi = res.table(FORGETTING_PER_IMAGE)
    lora = fg[fg["strategy"] == "lora"]["model"].tolist()
    if pi is not None and lora and primary in set(fg["model"]) and primary not in lora:
        a = pi[pi["model"] == primary].sort_values("index")["head"].to_numpy()
        b = pi[pi["model"] == lora[0]].sort_values("index")["head"].to_numpy()
        d, lo, hi = F.paired_bootstrap_diff(b, a, seed=3)  # > 0: lora kept more
        who = lora[0] if lo > 0 else (primary if hi < 0 else None)
        verdict = (
            f"{primary} forgot more of the source task than {lora[0]}"
            if who == lora[0]
            else (f"{lora[0]} forgot more of the source task than {primary}" if who else "")
        )
        verdict = verdict or f"{lora[0]} and {primary} forgot about as much of the source task"
        out.append(
            F.Finding(
                "forgetting_lora_vs_full",
                f"{verdict}: under the base head {lora[0]} keeps "
                f"{F.pct(b.mean())} source accuracy, {primary} {F.pct(a.mean())} ({100 * d:+.1f} points for {lora[0]}).",
                FORGETTING,
                score=8.6,
                uncertainty=f"95% CI {F.span(lo, hi, '+.1f', 100)} points (paired bootstrap over {len(a)} "
                f"source test {F.units()})",
            )
        )
    return out


ANALYSIS = register(
    Analysis(
        name="forgetting",
        title="Forgetting of the source task",
        order=45,
        tables=(FORGETTING, FORGETTING_REWIND, FORGETTING_PER_IMAGE),
        run=run,
        findings=findings,
        defaults={"forgetting_probe_per_class": 100},
        rules={"forgetting_probe_per_class": {"min": 2}},
    )
)
