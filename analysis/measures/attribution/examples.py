"""Example maps for the report: per method, the images whose base-vs-tuned maps changed most and least,
and those the tuned model fixed or broke."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

__all__ = ["EXAMPLE_KINDS", "AttributionExamples"]


EXAMPLE_KINDS = ("largest_change", "smallest_change", "fixed", "broken")


@dataclass
class AttributionExamples:
    """Images chosen for a grid, with both models' maps (signed: channel sum, ``(k, H, W)``)."""

    kinds: list[str]
    indices: np.ndarray
    inputs: np.ndarray
    masks: np.ndarray | None
    base: np.ndarray
    tuned: np.ndarray
    labels: np.ndarray
    base_pred: np.ndarray
    tuned_pred: np.ndarray
    similarity: np.ndarray


def pick_examples(
    d: pd.DataFrame, maps: Mapping[str, np.ndarray], x: torch.Tensor, masks: torch.Tensor | None, similarity: str
) -> AttributionExamples:
    sim = d[similarity].to_numpy(float)
    order = np.argsort(np.where(np.isnan(sim), np.inf, sim), kind="stable")  # most changed first
    correct_b = (d["base_pred"] == d["label"]).to_numpy()
    correct_t = (d["tuned_pred"] == d["label"]).to_numpy()
    chosen: list[tuple[str, int]] = []
    if len(d):
        chosen.append(("largest_change", int(order[0])))
        valid = order[~np.isnan(sim[order])]
        chosen.append(("smallest_change", int(valid[-1] if len(valid) else order[-1])))
        for kind, sel in (("fixed", ~correct_b & correct_t), ("broken", correct_b & ~correct_t)):
            cand = [i for i in order if sel[i]]
            if cand:
                chosen.append((kind, int(cand[0])))
    pos = np.array([i for _, i in chosen], dtype=np.int64)
    return AttributionExamples(
        kinds=[k for k, _ in chosen],
        indices=d["index"].to_numpy()[pos],
        inputs=x.numpy()[pos],
        masks=masks.numpy()[pos] if masks is not None else None,
        base=maps["base"][pos],
        tuned=maps["tuned"][pos],
        labels=d["label"].to_numpy()[pos],
        base_pred=d["base_pred"].to_numpy()[pos],
        tuned_pred=d["tuned_pred"].to_numpy()[pos],
        similarity=sim[pos],
    )
