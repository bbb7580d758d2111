"""Overview: data, models, training curves, where learning happened, and target accuracy per strategy."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tunelens.analysis.findings import units
from tunelens.core.results import Results

from .. import figures as fg
from ..model import Figure, Section, Table

ORDER = 0


def build(res: Results) -> Section | None:
    s = res.summary
    sec = Section("overview", "Overview")
    data = s.get("data", {})
    if data:
        classes = ", ".join(data.get("classes", []))
        size = (
            f"of up to {data.get('max_len', '?')} tokens"
            if "max_len" in data
            else f"of {data.get('image_size', '?')} pixels"
        )
        sec.intro = (
            f"Target task: {data.get('description', '')} {len(data.get('classes', []))} classes "
            f"({classes}); {data.get('n_train', '?')} training and {data.get('n_test', '?')} test {units()} "
            f"{size}. Base model: {s.get('base_description', '')}"
        )
    smp = res.arrays.get("samples")
    if smp is not None and "sentences" in smp and len(smp["sentences"]):
        names = data.get("classes", [])
        rows = {
            "sentence": smp["sentences"],
            "label": [names[int(c)] if int(c) < len(names) else str(int(c)) for c in smp["labels"]],
        }
        decisive = smp.get("decisive")
        known = decisive is not None and any(str(d).strip() for d in decisive)
        if known:  # real sentences (the text preset's reviews) come without decisive tokens: no empty column
            rows["decisive tokens"] = decisive
        sec.blocks.append(
            Table(
                "tbl-samples",
                "Example target sentences",
                pd.DataFrame(rows),
                collapsed=False,
                caption="Test sentences with their label and the tokens that decide it (ground truth for the "
                "attributions)."
                if known
                else "Test sentences with their label (no decisive tokens are known for them).",
            )
        )
    if smp is not None and "images" in smp and len(smp["images"]):
        n = min(8, len(smp["images"]))
        names = data.get("classes", [])
        images = [fg.to_display(smp["images"][i]) for i in range(n)]
        labels = [names[int(c)] if int(c) < len(names) else str(int(c)) for c in smp["labels"][:n]]
        masks = smp["masks"][:n] if "masks" in smp else None
        sec.blocks.append(
            Figure(
                "fig-samples",
                "Example target images",
                _sample_strip(images, labels, masks),
                "Test images with their ground-truth object outlined in yellow."
                if masks is not None
                else "Test images.",
            )
        )
    acc = res.table("accuracy")
    if acc is not None and len(acc):
        sec.blocks.append(
            Table(
                "tbl-accuracy",
                "Target test accuracy per model",
                acc,
                csv="accuracy",
                collapsed=False,
                caption="base is the pretrained model (source task); each tuned model starts from it "
                "with the named strategy; scratch is the same network trained from random "
                "initialisation with the fine-tuning budget.",
            )
        )
    tr = res.table("training")
    if tr is not None and len(tr) and "val_acc" in tr:
        tgt = tr[tr["model"] != "base"]
        if len(tgt):
            sec.blocks.append(
                Figure(
                    "fig-curves",
                    "Training curves on the target task",
                    fg.line_chart(tgt, "epoch", "val_acc", hue="model", ylabel="validation accuracy"),
                    "Validation accuracy per epoch; early stopping keeps the best epoch.",
                )
            )
        b = tr[tr["model"] == "base"]
        if len(b):
            sec.blocks.append(
                Figure(
                    "fig-pretrain",
                    "Pretraining curve (source task)",
                    fg.line_chart(
                        b.melt("epoch", ["train_acc", "val_acc"], "split", "acc"),
                        "epoch",
                        "acc",
                        hue="split",
                        ylabel="accuracy",
                        size=(5, 2.6),
                    ),
                    "Accuracy of the base model on its own (source) task.",
                )
            )
    ts = res.table("training_stages")
    if ts is not None and len(ts):
        ts = ts[ts["model"] != "base"].copy()
        if len(ts):
            ts["update_ratio"] = ts["update_ratio"].replace(0, np.nan)
            agg = ts.groupby(["model", "stage"], sort=False)["update_ratio"].mean().reset_index()
            order = list(dict.fromkeys(ts.sort_values("depth", kind="stable")["stage"]))
            sec.blocks.append(
                Figure(
                    "fig-update-ratio",
                    "Where learning happened: update ratio per stage",
                    fg.bar_chart(
                        agg.dropna(),
                        "stage",
                        "update_ratio",
                        hue="model",
                        logy=True,
                        order=order,
                        ylabel="mean ||step|| / ||theta||",
                    ),
                    "Mean per-step update ratio ||step||/||theta|| of each stage over the fine-tuning run (log scale); "
                    "frozen stages have no bar.",
                )
            )
            gn = ts.groupby(["model", "stage"], sort=False)["grad_norm"].mean().reset_index()
            sec.blocks.append(
                Figure(
                    "fig-grad-norm",
                    "Gradient norm per stage",
                    fg.bar_chart(
                        gn[gn["grad_norm"] > 0],
                        "stage",
                        "grad_norm",
                        hue="model",
                        logy=True,
                        order=order,
                        ylabel="mean per-step ||grad||",
                    ),
                    "Root-mean-square over the run's steps of each stage's gradient norm (log scale); frozen stages "
                    "have no gradient.",
                )
            )
            sec.blocks.append(
                Table(
                    "tbl-training-stages",
                    "Gradient norm and update ratio per stage and epoch",
                    ts,
                    csv="training_stages",
                    collapsed=True,
                )
            )
    if not sec.intro and not sec.blocks and not sec.notes:
        return None  # nothing to say (tunelens weights: no data, no training)
    return sec


def _sample_strip(images, labels, masks) -> str:
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.2 * n, 1.5), squeeze=False)
    for j in range(n):
        ax = axes[0][j]
        ax.imshow(images[j], interpolation="nearest")
        if masks is not None and np.asarray(masks[j]).any():
            ax.contour(np.asarray(masks[j], dtype=float), levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(labels[j], fontsize=7)
    fig.tight_layout()
    return fg.fig_to_uri(fig, "png")
