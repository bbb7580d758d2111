"""Evaluation: per-image predictions of every model, accuracy per model, training curves; transfer findings."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from tunelens.analysis import findings as F
from tunelens.analysis.engine.passes import ModelPass
from tunelens.analysis.engine.registry import Analysis, Context, Output, register
from tunelens.analysis.engine.sharding import batch_offsets, gather_rows
from tunelens.analysis.findings import Finding, paired_bootstrap_diff, pct, units
from tunelens.analysis.measures.class_order import ALPHA, ClassOrder, confusion_matrix, detect_class_order
from tunelens.core.evaluation import unpack_batch
from tunelens.core.models import eval_mode
from tunelens.core.results import Results

PREDICTIONS = "predictions"
ACCURACY = "accuracy"
TRAINING = "training"
TRAINING_STAGES = "training_stages"
SAMPLES = "samples"  # array: a few test images (and masks) for the report


@torch.inference_mode()
def predictions_table(models: dict[str, nn.Module], loader: DataLoader, device: torch.device) -> pd.DataFrame:
    """Per model and test image: label, prediction, correctness and the loss (for paired comparisons).

    Under ``torch.distributed`` with a :func:`tunelens.analysis.engine.sharding.shard_loader` loader each rank predicts
    its batches and the rows of all ranks are gathered (a collective), in single-process order."""

    def outputs(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        with eval_mode(model):
            for batch in loader:
                x, y, _ = unpack_batch(batch)
                yield model(x.to(device, non_blocking=True)).float().cpu(), y

    return _predictions({n: outputs(m) for n, m in models.items()}, batch_offsets(loader))


def predictions_from_passes(passes: Mapping[str, ModelPass]) -> pd.DataFrame:
    """:func:`predictions_table` from recorded passes (:mod:`tunelens.analysis.engine.passes`) over the test loader."""
    return _predictions(
        {n: zip(p.logits, p.labels, strict=True) for n, p in passes.items()},
        next(iter(passes.values())).offsets if passes else None,
    )


def _predictions(
    outputs: Mapping[str, Iterable[tuple[torch.Tensor, torch.Tensor | None]]], offsets: list[int] | None
) -> pd.DataFrame:
    frames = []
    for name, batches in outputs.items():
        rows = []
        idx = 0
        for b, (out, y) in enumerate(batches):
            if offsets is not None:
                idx = offsets[b]
            if y is None:
                raise ValueError("evaluation needs labelled batches (inputs, labels[, masks])")
            y = torch.as_tensor(y).long()
            loss = torch.nn.functional.cross_entropy(out, y, reduction="none")
            pred = out.argmax(1)
            for i in range(len(y)):
                rows.append(
                    {
                        "model": name,
                        "index": idx,
                        "label": int(y[i]),
                        "pred": int(pred[i]),
                        "correct": int(pred[i] == y[i]),
                        "loss": float(loss[i]),
                    }
                )
                idx += 1
        frames.append(gather_rows(rows, sort_by="index"))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def accuracy_table(preds: pd.DataFrame, manifests: dict) -> pd.DataFrame:
    """Accuracy, mean loss and count per model, with its role, strategy and training time."""
    acc = (
        preds.groupby("model", sort=False)
        .agg(acc=("correct", "mean"), loss=("loss", "mean"), n=("correct", "size"))
        .reset_index()
    )
    acc["role"] = acc["model"].map(lambda n: manifests[n].get("role"))
    acc["strategy"] = acc["model"].map(lambda n: manifests[n].get("strategy"))
    acc["train_seconds"] = acc["model"].map(lambda n: manifests[n].get("seconds"))
    acc["trainable_params"] = acc["model"].map(lambda n: manifests[n].get("trainable_params"))
    return acc


def training_tables(manifests: dict[str, dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training curves (per model, epoch) and per-stage gradient norm / update ratio (long format)."""
    curves, stages = [], []
    for name, man in manifests.items():
        order = man.get("stage_order", [])
        for rec in man.get("history", []):
            curves.append({"model": name, **{k: v for k, v in rec.items() if not isinstance(v, dict)}})
            for s, g in rec.get("grad_norm", {}).items():
                stages.append(
                    {
                        "model": name,
                        "epoch": rec["epoch"],
                        "stage": s,
                        "depth": order.index(s) if s in order else len(order),
                        "grad_norm": g,
                        "update_ratio": rec.get("update_ratio", {}).get(s),
                    }
                )
    st = pd.DataFrame(stages)
    if len(st):
        st = st.sort_values(["model", "epoch", "depth"], kind="stable").reset_index(drop=True)
    return pd.DataFrame(curves), st


def run(ctx: Context) -> Output:
    test = ctx.data["test"]
    sample = [test[i] for i in range(min(8, len(test)))]
    samples = {"labels": np.asarray([int(b[1]) for b in sample])}
    if hasattr(test, "sentences") and hasattr(test, "tokens"):  # text: the sentences, their decisive words
        samples["sentences"] = np.array([test.sentences[i] for i in range(len(sample))], dtype=str)
        samples["decisive"] = np.array(
            [
                " ".join(t for t, m in zip(test.tokens[i], torch.as_tensor(b[2]).tolist(), strict=False) if m > 0)
                for i, b in enumerate(sample)
            ],
            dtype=str,
        )
    else:
        samples["images"] = torch.stack([b[0] for b in sample]).numpy()
        if sample and len(sample[0]) > 2:
            samples["masks"] = torch.stack([torch.as_tensor(b[2]) for b in sample]).numpy()
    models = {n: m for n, m in ctx.models.items() if n != "base"}
    preds = predictions_from_passes({n: ctx.passes.get(m) for n, m in models.items()})
    curves, stages = training_tables({k: dict(v) for k, v in ctx.manifests.items()})
    names = [str(c) for c in (getattr(test, "classes", None) or [])]
    return Output(
        summary={"class_names": names} if names else {},
        tables={
            PREDICTIONS: preds,
            ACCURACY: accuracy_table(preds, {k: dict(v) for k, v in ctx.manifests.items()}),
            TRAINING: curves,
            TRAINING_STAGES: stages,
        },
        arrays={SAMPLES: samples},
    )


def findings(res: Results) -> list[F.Finding]:
    preds = res.table(PREDICTIONS)
    if preds is None or preds.empty:
        return []
    return class_order_findings(preds, res.summary.get("class_names") or []) + transfer_findings(
        preds, primary=res.summary.get("primary", "full")
    )


ANALYSIS = register(
    Analysis(
        name="evaluation",
        title="Target accuracy",
        order=0,
        tables=(PREDICTIONS, ACCURACY, TRAINING, TRAINING_STAGES),
        run=run,
        findings=findings,
        optional=False,
        compares_models=False,
    )
)


# ---- findings: this analysis's sentences, formatted from its tables


def transfer_findings(predictions: pd.DataFrame, primary: str = "full", control: str = "scratch") -> list[Finding]:
    """Does pretraining beat training from scratch, and which strategy is best (paired bootstrap over test images)."""
    out = []
    models = list(dict.fromkeys(predictions["model"]))
    acc = predictions.groupby("model", sort=False)["correct"].mean()
    if primary in models and control in models:
        a = predictions[predictions.model == primary].sort_values("index")["correct"].to_numpy()
        b = predictions[predictions.model == control].sort_values("index")["correct"].to_numpy()
        d, lo, hi = paired_bootstrap_diff(a, b)
        verdict = (
            "Pretraining helped"
            if lo > 0
            else ("Pretraining hurt" if hi < 0 else "Pretraining made no clear difference")
        )
        out.append(
            Finding(
                "transfer",
                f"{verdict}: fine-tuning from the pretrained weights ({primary}) reaches "
                f"{pct(acc[primary])} target test accuracy against {pct(acc[control])} for the same network trained "
                f"from scratch with the same budget ({100 * d:+.1f} points).",
                "accuracy",
                score=10 + abs(d) * 10,
                uncertainty=f"95% CI of the difference {F.span(lo, hi, '+.1f', 100)} points "
                f"(paired bootstrap over {len(a)} test {units()})",
            )
        )
    tuned = [m for m in models if m not in (control, "base")]
    if len(tuned) > 1:
        best = max(tuned, key=lambda m: acc[m])
        worst = min(tuned, key=lambda m: acc[m])
        a = predictions[predictions.model == best].sort_values("index")["correct"].to_numpy()
        b = predictions[predictions.model == worst].sort_values("index")["correct"].to_numpy()
        d, lo, hi = paired_bootstrap_diff(a, b, seed=1)
        out.append(
            Finding(
                "best_strategy",
                f"Of the fine-tuning strategies, {best} scores best ({pct(acc[best])}) and {worst} "
                f"worst ({pct(acc[worst])}), a gap of {100 * d:.1f} points.",
                "strategies",
                score=6 + d * 5,
                uncertainty=f"95% CI {F.span(lo, hi, '+.1f', 100)} points (paired bootstrap)",
            )
        )
    return out


#: the class-order finding leads every other (even the "identical weights" and small-data findings)
CLASS_ORDER_SCORE = 120.0


def _mapping(order: ClassOrder, classes: list[str], shown: int = 6) -> str:
    def name(i: int) -> str:
        return repr(classes[i]) if i < len(classes) else f"class {i}"

    parts = [f"the data's class {name(i)} looks like the head's output {j} ({name(j)})" for i, j in order.moved()]
    more = len(parts) - shown
    return "; ".join(parts[:shown]) + (f"; and {more} more" if more > 0 else "")


def class_order_findings(predictions: pd.DataFrame, classes: list[str]) -> list[Finding]:
    """Per tuned model whose predictions flag a class-order mismatch (:func:`detect_class_order` on its
    confusion matrix: below chance, a permutation far above it): the likely mapping by class name and the fix,
    ``--classes`` with the names in the head's order. Ranked first (:data:`CLASS_ORDER_SCORE`)."""
    out: list[Finding] = []
    if predictions.empty:
        return out
    k = max(int(predictions["label"].max()), int(predictions["pred"].max())) + 1
    k = max(k, len(classes))
    for model in dict.fromkeys(predictions["model"]):
        p = predictions[predictions["model"] == model]
        order = detect_class_order(confusion_matrix(p["label"].to_numpy(), p["pred"].to_numpy(), k))
        if not order.flagged:
            continue
        fix = (
            f" Rerun with --classes {','.join(order.head_order(classes))} (the head's output order)"
            if len(classes) == k
            else " Give --classes with the class names in the head's output order"
        )
        out.append(
            Finding(
                f"class_order_{model}",
                f"{model} scores below chance ({pct(order.accuracy)} against {pct(order.chance)} for always "
                f"guessing the largest class), but its predictions match a reordering of the classes: read in "
                f"another order its outputs would be right on {pct(order.permuted_accuracy)} of the test "
                f"{units()}. The data most likely lists its classes in another order than the head: "
                f"{_mapping(order, classes)}.{fix}; every accuracy below reads the data's order.",
                "accuracy",
                score=CLASS_ORDER_SCORE,
                uncertainty=f"binomial test against chance and sign test against the data's order, both p < {ALPHA:g} "
                f"(largest p {order.p_value:.1e}) over {order.n} test {units()}; the reordering is fitted on the "
                "same predictions",
            )
        )
    return out
