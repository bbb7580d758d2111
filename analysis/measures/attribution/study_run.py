"""The attribution study's computation (:func:`run_study`): the images, the prepared models (a probe head where
the heads differ, the randomized floors), every method's maps for base, tuned, ceiling and floors, their
comparison, the faithfulness games, and the tables; :class:`AttributionStudy` holds the result. The method and
its calibration are described in :mod:`tunelens.analysis.measures.attribution.study`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tunelens.analysis.measures.attribution.attribute import attribute_group, merge_options, shares_gradient
from tunelens.analysis.measures.attribution.batching import auto_eval_batch
from tunelens.analysis.measures.attribution.examples import AttributionExamples, pick_examples
from tunelens.analysis.measures.attribution.faithfulness import deletion_insertion
from tunelens.analysis.measures.attribution.map_metrics import SIMILARITIES, compare_maps, to_maps
from tunelens.analysis.measures.attribution.methods import (
    GRADIENT_METHODS,
    STOCHASTIC_METHODS,
    STUDY_OPTIONS,
)
from tunelens.analysis.measures.attribution.prepare import (
    cascade_stages,
    output_dim,
    prepare_for_attribution,
    randomize_cascading,
)
from tunelens.analysis.measures.attribution.probe_head import fit_probe_head
from tunelens.analysis.measures.attribution.stats import (
    faithfulness_table,
    localisation_table,
    per_class_table,
    summary_table,
)
from tunelens.analysis.measures.attribution.targets import predictions
from tunelens.core.evaluation import unpack_batch
from tunelens.core.models import model_device
from tunelens.core.runtime import resolve_device

__all__ = ["AttributionStudy", "collect_images", "run_study", "shift"]


@dataclass
class AttributionStudy:
    """Everything :func:`attribution_study` measured.

    ``comparisons``: one row per image and method -- base-vs-tuned similarities
    (:data:`tunelens.analysis.measures.attribution.map_metrics.SIMILARITIES`), ``ceiling_<sim>``, ``floor_<sim>``, ``floor_top_<sim>``, mask
    metrics ``mass_base``/``mass_tuned``/``rank_acc_*``/``pointing_*`` (with masks),
    ``deletion_base``/``insertion_base``/``deletion_tuned``/``insertion_tuned`` (with
    faithfulness), labels, predictions and targets.
    ``summary``: one row per method -- ``ab``, ``ceiling``, ``floor``, ``floor_top``, ``gap``
    (ceiling - floor), ``gap_top``, ``change_index`` (with bootstrap CI), ``change_index_top``,
    ``informative``, ``threshold``, ``similarity``, the mean of every similarity for
    AB/ceiling/floor/floor_top, faithfulness means, seconds.
    ``localisation``: per method and mask metric, base and tuned means, their difference,
    bootstrap CIs (None without masks; see ``localisation_note``).
    ``per_class``: per method and class, AB similarity with CI and change index (method-level
    ceiling and floor), mass in mask per model.
    ``faithfulness``: per method and model, deletion and insertion AUC with CIs.
    ``examples``: per method, the images of :data:`EXAMPLE_KINDS` for a grid.
    ``maps``: per method, signed ``(N, H, W)`` maps of ``base``, ``tuned``, ``ceiling``, ``floor``,
    ``floor_top``.
    """

    comparisons: pd.DataFrame
    summary: pd.DataFrame
    localisation: pd.DataFrame | None
    per_class: pd.DataFrame
    faithfulness: pd.DataFrame | None
    examples: dict[str, AttributionExamples]
    maps: dict[str, dict[str, np.ndarray]]
    inputs: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    classes: list[str]
    base_pred: np.ndarray
    tuned_pred: np.ndarray
    notes: list[str] = field(default_factory=list)
    localisation_note: str | None = None
    probe: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def informative_methods(self) -> list[str]:
        """Methods whose numbers may be used for findings."""
        return self.summary.loc[self.summary["informative"], "method"].tolist()


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------


def collect_images(
    data: Any, n_images: int, seed: int = 0, exclude: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, np.ndarray]:
    """``(inputs, labels, masks, indices)`` of ``n_images`` drawn without replacement (seeded) from a dataset,
    or the first ``n_images`` of a loader / iterable of batches (indices = positions)."""
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (list, tuple)):
        pool = np.setdiff1d(np.arange(len(data)), np.asarray(exclude, dtype=np.int64))
        idx = np.sort(np.random.default_rng(seed).permutation(pool)[:n_images])
        items = [data[int(i)] for i in idx]
        if not items:
            raise ValueError("no images to attribute: the data set is empty (or every image is excluded)")
        if isinstance(items[0], torch.Tensor):
            return torch.stack(items), None, None, idx
        x = torch.stack([it[0] for it in items])
        y = torch.as_tensor(np.array([int(it[1]) for it in items])) if len(items[0]) > 1 else None
        m = torch.stack([torch.as_tensor(it[2]).bool() for it in items]) if len(items[0]) > 2 else None
        return x, y, m, idx
    xs, ys, ms, seen = [], [], [], 0
    for batch in data:
        x, y, m = unpack_batch(batch)
        xs.append(x)
        ys.append(y)
        ms.append(m)
        seen += len(x)
        if seen >= n_images:
            break
    x = torch.cat(xs)[:n_images]
    y = torch.cat([v for v in ys if v is not None])[:n_images] if all(v is not None for v in ys) else None
    m = torch.cat([v for v in ms if v is not None])[:n_images].bool() if all(v is not None for v in ms) else None
    return x, y, m, np.arange(len(x))


def shift(x: torch.Tensor) -> torch.Tensor:
    """The image moved one pixel to the right (the first column repeated)."""
    return torch.cat([x[..., :1], x[..., :-1]], dim=-1)


# ----------------------------------------------------------------------------------------------
# the computation
# ----------------------------------------------------------------------------------------------


def run_study(
    base: nn.Module,
    tuned: nn.Module,
    data: Any,
    methods: Sequence[str],
    *,
    n_images: int,
    seed: int,
    device: str | torch.device | None,
    target: str,
    probe_data: Any,
    classes: Sequence[str] | None,
    options: Mapping[str, Mapping[str, Any]] | None,
    similarity: str,
    threshold: float,
    top_stages: int,
    faithfulness: bool | Sequence[str],
    faithfulness_steps: int,
    k: float,
    n_boot: int,
    shap_baselines: int,
    eval_batch: int | None,
    progress: bool,
    threads: int,
) -> AttributionStudy:
    """The study of :func:`~tunelens.analysis.measures.attribution.study.attribution_study` with every argument
    given (``threads``: the torch threads it runs with, recorded in its settings)."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if target not in ("label", "pred"):
        raise ValueError(f"target must be 'label' or 'pred', got {target!r}")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = []
    dev = model_device(tuned) if device is None else resolve_device(device)
    x, y, masks, idx = collect_images(data, n_images, seed)
    n = len(x)
    if y is None and target == "label":
        raise ValueError("target='label' needs labelled data; pass target='pred' for unlabelled images")
    classes = list(classes) if classes is not None else list(getattr(data, "classes", []) or [])

    # models: prepared copies; a probe head when the heads differ; the randomized floor
    t = time.perf_counter()
    pt = prepare_for_attribution(tuned, x, device=dev)
    n_out = output_dim(pt, x)
    probe_info = None
    if output_dim(base, x) != n_out:
        if probe_data is None:
            raise ValueError(
                f"the base model has {output_dim(base, x)} outputs and the tuned model {n_out}: pass "
                "probe_data (labelled training images of the target task) to fit a linear-probe head"
            )
        base_probe, probe_info = fit_probe_head(
            prepare_for_attribution(base, x, device=dev), probe_data, num_classes=n_out, device=dev
        )
        notes.append(
            f"The base model's head answers another task, so it was attributed through a linear-probe "
            f"head (logistic regression on its pooled penultimate features, {probe_info['n_train']} "
            f"training images, training accuracy {100 * probe_info['train_acc']:.1f}%): both models "
            "answer the same question."
        )
        pb = base_probe
    else:
        pb = prepare_for_attribution(base, x, device=dev)
    pf = randomize_cascading(pb, seed=seed)
    pf_top = randomize_cascading(pb, n_stages=min(top_stages, len(cascade_stages(pb))), seed=seed)
    timings["prepare"] = time.perf_counter() - t
    if eval_batch is None:
        eval_batch = min(auto_eval_batch(m, x, dev) for m in (pb, pt))
    base_pred, tuned_pred = predictions(pb, x), predictions(pt, x)
    if target == "label":
        if y is None:
            raise ValueError("target='label' needs labelled data (inputs, labels[, masks]); use target='pred'")
        tb = tt = y.long()
    else:
        tb, tt = base_pred, tuned_pred
    if masks is None:
        loc_note = "Localisation omitted: the data has no ground-truth masks, so relevance mass, rank accuracy and the pointing game cannot be computed."
        notes.append(loc_note)
    else:
        loc_note = None

    shap_bl = None
    if "gradient_shap" in methods and shap_baselines > 0 and hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        # baselines from images outside the study; when the study uses every image, from the images themselves
        others = len(data) > len(idx)
        bx, _, _, _ = collect_images(data, shap_baselines, seed + 1, exclude=list(idx) if others else [])
        shap_bl = bx if len(bx) else None

    # under torch.distributed each rank attributes its own contiguous block of the images; rows and maps are
    # gathered afterwards in single-process order, so the statistics below see every image once
    from tunelens.core import runtime

    world = runtime.world_size() if n >= runtime.world_size() else 1
    bounds = np.linspace(0, n, world + 1).astype(int)
    lo, hi = (int(bounds[runtime.rank()]), int(bounds[runtime.rank() + 1])) if world > 1 else (0, n)
    xs, tbs, tts = x[lo:hi], tb[lo:hi], tt[lo:hi]
    ms = masks[lo:hi] if masks is not None else None

    rows, maps = [], {}
    # saliency (|d logit / d x|) and input x gradient (x * d logit / d x) read the same gradient: one backward
    # pass per model and input set serves both when neither has options of its own
    share = shares_gradient(methods, options)
    grads: dict[str, list[torch.Tensor]] = {}

    def group(
        ms: list[nn.Module], inputs: torch.Tensor, targets: list[torch.Tensor], method: str, kind: str, **kw: Any
    ) -> list[torch.Tensor]:
        if not (share and method in GRADIENT_METHODS):
            return attribute_group(ms, inputs, targets, method, desc=f"{method} ({kind})", **kw)
        if kind not in grads:
            grads[kind] = attribute_group(ms, inputs, targets, "saliency", desc=f"gradients ({kind})", abs=False, **kw)
        if method == "saliency":
            return [g.abs() for g in grads[kind]]
        return [inputs.to(g.device) * g for g in grads[kind]]

    for method in methods:
        t = time.perf_counter()
        opts = dict(STUDY_OPTIONS.get(method, {}))
        opts.update((options or {}).get(method, {}))
        if method == "occlusion" and "window" not in (options or {}).get(method, {}):
            side = int(x.shape[-1])  # 8 px windows every 6 px at 32 px; the same 5 x 5 grid on larger inputs
            opts["window"], opts["stride"] = max(2, side // 4), max(1, side * 3 // 16)
        if method == "gradient_shap" and shap_bl is not None and "baselines" not in opts:
            opts["baselines"] = shap_bl
        a_b, a_t, a_f, a_ft = group(
            [pb, pt, pf, pf_top],
            xs,
            [tbs, tts, tbs, tbs],
            method,
            "base, tuned, floors",
            seed=seed,
            eval_batch=eval_batch,
            progress=progress,
            **opts,
        )
        if method in STOCHASTIC_METHODS:
            a_c = attribute_group(
                [pb],
                xs,
                [tbs],
                method,
                seed=seed + 1_000_003,
                eval_batch=eval_batch,
                progress=progress,
                desc=f"{method} (ceiling)",
                **opts,
            )[0]
            ref_b, ref_c = a_b, a_c
        else:
            a_c = group(
                [pb], shift(xs), [tbs], method, "ceiling", seed=seed, eval_batch=eval_batch, progress=progress, **opts
            )[0]
            ref_b, ref_c = a_b[..., :-1], a_c[..., 1:]
        timings[method] = time.perf_counter() - t
        df = compare_maps(a_b, a_t, ms, k=k, names=("base", "tuned"))
        ceil = compare_maps(ref_b, ref_c, k=k)
        flo = compare_maps(a_b, a_f, k=k)
        flo_top = compare_maps(a_b, a_ft, k=k)
        for s in SIMILARITIES:
            df[f"ceiling_{s}"] = ceil[s].to_numpy()
            df[f"floor_{s}"] = flo[s].to_numpy()
            df[f"floor_top_{s}"] = flo_top[s].to_numpy()
        sb, st = to_maps(a_b, "signed"), to_maps(a_t, "signed")
        if faithfulness is True or (not isinstance(faithfulness, bool) and method in faithfulness):
            t = time.perf_counter()
            for role, model, mp, tg in (("base", pb, sb, tbs), ("tuned", pt, st, tts)):
                fi = deletion_insertion(model, xs, mp, tg, steps=faithfulness_steps, eval_batch=2 * eval_batch)
                df[f"deletion_{role}"] = fi["deletion_auc"]
                df[f"insertion_{role}"] = fi["insertion_auc"]
            timings[f"{method}_faithfulness"] = time.perf_counter() - t
        df.insert(0, "method", method)
        df["index"] = idx[lo:hi]
        if "sample" in df:
            df["sample"] += lo  # position in the whole study, not in this rank's block
        df["label"] = y.numpy()[lo:hi] if y is not None else -1
        df["class"] = [classes[int(c)] if y is not None and int(c) < len(classes) else str(int(c)) for c in df["label"]]
        df["base_pred"], df["tuned_pred"] = base_pred.numpy()[lo:hi], tuned_pred.numpy()[lo:hi]
        df["target_base"], df["target_tuned"] = tbs.numpy(), tts.numpy()
        rows.append(df)
        maps[method] = {
            "base": sb.astype(np.float32),
            "tuned": st.astype(np.float32),
            "ceiling": to_maps(a_c, "signed").astype(np.float32),
            "floor": to_maps(a_f, "signed").astype(np.float32),
            "floor_top": to_maps(a_ft, "signed").astype(np.float32),
        }
    if world > 1:
        parts = runtime.all_gather_objects((rows, maps))
        rows = [pd.concat([p[0][i] for p in parts], ignore_index=True) for i in range(len(methods))]
        maps = {m: {key: np.concatenate([p[1][m][key] for p in parts]) for key in maps[m]} for m in methods}
    comparisons = pd.concat(rows, ignore_index=True)

    summary = summary_table(comparisons, methods, similarity, threshold, n_boot, seed, timings)
    localisation = localisation_table(comparisons, methods, n_boot, seed) if masks is not None else None
    per_class = per_class_table(comparisons, summary, methods, similarity, n_boot, seed, masks is not None)
    faith_methods = (
        list(methods) if faithfulness is True else [m for m in methods if faithfulness and m in faithfulness]
    )
    faith = faithfulness_table(comparisons, faith_methods, n_boot, seed) if faith_methods else None
    examples = {
        m: pick_examples(comparisons[comparisons["method"] == m], maps[m], x, masks, similarity) for m in methods
    }
    flagged = summary.loc[~summary["informative"], "method"].tolist()
    if flagged:
        notes.append(
            f"Uninformative for this question (ceiling - floor of {similarity} below {threshold}, with "
            f"all stages or only the top {top_stages} randomized): {', '.join(flagged)}; their numbers "
            "are not used for findings."
        )
    timings["total"] = time.perf_counter() - t_start
    settings = {
        "methods": list(methods),
        "n_images": n,
        "seed": seed,
        "target": target,
        "similarity": similarity,
        "threshold": threshold,
        "k": k,
        "n_boot": n_boot,
        "faithfulness_steps": faithfulness_steps,
        "eval_batch": eval_batch,
        "device": str(dev),
        "threads": threads,
        "options": {
            m: {
                kk: vv
                for kk, vv in merge_options(m, {**STUDY_OPTIONS.get(m, {}), **(options or {}).get(m, {})}).items()
                if not isinstance(vv, torch.Tensor)
            }
            for m in methods
        },
        "ceiling": "new noise seed (smoothgrad, gradient_shap); one-pixel horizontal shift (others)",
        "floor": "all stages re-initialised, cascading from the head (seeded)",
        "floor_top": f"the top {top_stages} stages re-initialised: {', '.join(cascade_stages(pb)[:top_stages])}",
        "top_stages": top_stages,
        "channel_reduction": "signed = channel sum; absolute = channel sum of |.|",
    }
    return AttributionStudy(
        comparisons=comparisons,
        summary=summary,
        localisation=localisation,
        per_class=per_class,
        faithfulness=faith,
        examples=examples,
        maps=maps,
        inputs=x.numpy(),
        labels=(y.numpy() if y is not None else np.full(n, -1)),
        masks=masks.numpy() if masks is not None else None,
        classes=classes,
        base_pred=base_pred.numpy(),
        tuned_pred=tuned_pred.numpy(),
        notes=notes,
        localisation_note=loc_note,
        probe=probe_info,
        settings=settings,
        timings=timings,
    )
