"""Did fine-tuning change where the model looks? Base-vs-tuned attribution maps, calibrated.

:func:`attribution_study` computes, for each attribution method, the maps of the base
and the fine-tuned model on the same images (same targets, baselines and random
draws), compares them per image (:func:`analysis.map_metrics.compare_maps`), checks them
against object masks and for faithfulness (deletion/insertion), and calibrates each
method's base-vs-tuned agreement between

* a **ceiling**: the base model against itself under a tiny perturbation -- a new noise
  seed for the stochastic methods (SmoothGrad, GradientShap), the input shifted by one
  pixel (and the map shifted back) for the deterministic ones;
* a **floor**: the base model against a copy with its weights re-initialised by cascading
  randomization from the head down (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"),
  seeded, at two depths: ``floor`` = every stage randomized (the change index's scale), and
  ``floor_top`` = only the top ``top_stages`` stages (head and last block by default), the
  part of the network that fine-tuning re-purposes;

as a **change index** ``(ceiling - AB) / (ceiling - floor)`` of the mean similarity
(absolute-value Spearman by default; 0 = as similar as the base model is to itself, 1 = as
different as a fully random network; negative = closer than the ceiling). A method is
flagged ``informative = False`` when its ceiling and floor are close -- ``ceiling - floor``
or ``ceiling - floor_top`` below ``threshold`` (0.1 by default): its maps hardly move when
the decision layers are replaced by random ones, so they cannot show what fine-tuning did
to them. Guided backprop is the known case: it largely reconstructs the image from the
lowest layers and ignores the upper ones (Adebayo et al. 2018; Nie et al. 2018). Flagged
methods' numbers should not be used for findings.

When the two models' heads differ (an external checkpoint or a pretrained base with
source-task classes), the base model is attributed through a linear-probe head fitted
on ``probe_data`` (:func:`analysis.prepare.fit_probe_head`), so both models answer the
same question; :attr:`AttributionStudy.notes` says so.
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

from tunelens.core.evaluation import unpack_batch
from tunelens.core.models import model_device
from tunelens.core.runtime import resolve_device

from .attribution import (
    DEFAULT_METHODS,
    GRADIENT_METHODS,
    STOCHASTIC_METHODS,
    _merge_options,
    attribute_group,
    auto_eval_batch,
    predictions,
    shares_gradient,
)
from .attribution_examples import AttributionExamples, _examples
from .attribution_stats import (
    _faithfulness,
    _localisation,
    _per_class,
    _summary,
    bootstrap_ci,
    change_index,
)
from .faithfulness import deletion_insertion
from .map_metrics import SIMILARITIES, compare_maps, to_maps
from .prepare import cascade_stages, fit_probe_head, output_dim, prepare_for_attribution, randomize_cascading

__all__ = [
    "STUDY_OPTIONS",
    "AttributionExamples",
    "AttributionStudy",
    "attribution_study",
    "bootstrap_ci",
    "change_index",
    "collect_images",
]

#: Method options of the study (on top of :data:`analysis.attribution.DEFAULT_OPTIONS`), sized so the
#: default run (tiny_resnet, 32x32, 64 images, 8 methods, 4 maps each) stays within its time budget on 2 CPU cores.
STUDY_OPTIONS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 16},
    "smoothgrad": {"nt_samples": 8},
    "gradient_shap": {"n_samples": 8},
    "occlusion": {"window": 8, "stride": 6},
}


@dataclass
class AttributionStudy:
    """Everything :func:`attribution_study` measured.

    ``comparisons``: one row per image and method -- base-vs-tuned similarities
    (:data:`analysis.map_metrics.SIMILARITIES`), ``ceiling_<sim>``, ``floor_<sim>``, ``floor_top_<sim>``, mask
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
# statistics
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


def _shift(x: torch.Tensor) -> torch.Tensor:
    """The image moved one pixel to the right (the first column repeated)."""
    return torch.cat([x[..., :1], x[..., :-1]], dim=-1)


# ----------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------


def attribution_study(
    base: nn.Module,
    tuned: nn.Module,
    data: Any,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    n_images: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    target: str = "label",
    probe_data: Any = None,
    classes: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    similarity: str = "spearman_abs",
    threshold: float = 0.1,
    top_stages: int = 2,
    faithfulness: bool | Sequence[str] = ("integrated_gradients", "grad_cam"),
    faithfulness_steps: int = 16,
    k: float = 0.1,
    n_boot: int = 1000,
    shap_baselines: int = 16,
    eval_batch: int | None = None,
    threads: int | str | None = "auto",
    progress: bool = False,
) -> AttributionStudy:
    """Base-vs-tuned attribution maps of ``methods`` on ``n_images`` images of ``data``, calibrated.

    ``data``: a dataset or loader of ``(image, label[, mask])``. ``target``: ``"label"``
    (true class, default) or ``"pred"`` (each model its own prediction; the ceiling and
    floor use the base model's). ``probe_data``: labelled training images for the
    linear-probe head, needed when the models' heads differ in size. ``options``:
    per-method options on top of :data:`STUDY_OPTIONS`. ``similarity``: the similarity
    of the change index (one of :data:`analysis.map_metrics.SIMILARITIES`); ``threshold``: the
    least ``ceiling - floor`` (and ``ceiling - floor_top``) of an informative method; ``top_stages``:
    how many stages from the top ``floor_top`` randomizes. GradientShap's baseline
    distribution is ``shap_baselines`` other images of ``data`` (the same for every model).
    ``faithfulness``: deletion/insertion AUC (RISE) for these methods (default integrated gradients and
    Grad-CAM: each costs 2 x ``faithfulness_steps`` forward passes per image and model), all (True) or none.
    ``threads``: torch CPU threads during the study (restored after); ``"auto"`` uses one thread
    when other processes already keep every core busy (the 1-minute load average less this process's own
    share, :func:`_own_load`, at least the number of cores), where a descheduled OpenMP worker stalls every
    small operator (measured 3x slower with two threads than with one on a loaded 2-core machine), and
    leaves the setting alone otherwise (this process's own threads never count: on an idle 2-core machine a
    2-thread run keeps the load average near 2 by itself); None leaves it alone.
    """
    n_threads = torch.get_num_threads()
    use = _auto_threads(threads)
    if use is not None:
        torch.set_num_threads(use)
    try:
        return _study(
            base,
            tuned,
            data,
            methods,
            n_images=n_images,
            seed=seed,
            device=device,
            target=target,
            probe_data=probe_data,
            classes=classes,
            options=options,
            similarity=similarity,
            threshold=threshold,
            top_stages=top_stages,
            faithfulness=faithfulness,
            faithfulness_steps=faithfulness_steps,
            k=k,
            n_boot=n_boot,
            shap_baselines=shap_baselines,
            eval_batch=eval_batch,
            progress=progress,
            threads=torch.get_num_threads(),
        )
    finally:
        torch.set_num_threads(n_threads)


def _own_load() -> float:
    """This process's share of the load average: its CPU seconds over its age (the cores it kept busy on
    average), at most its torch threads; 0 where ``/proc`` cannot tell."""
    import os

    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/uptime") as f:
            age = float(f.read().split()[0]) - start / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    return min(float(torch.get_num_threads()), time.process_time() / max(age, 1e-3))


def _auto_threads(threads: int | str | None) -> int | None:
    if threads is None:
        return None
    if threads == "auto":
        import os

        try:  # the load of *other* processes: this one's own threads (a run computing on 2 threads keeps the
            # 1-minute load near 2 on its own) are not a reason to give up a core
            others = os.getloadavg()[0] - _own_load()
        except OSError:
            others = 0.0
        busy = others >= (os.cpu_count() or 1)
        return 1 if busy and not torch.cuda.is_available() else None
    return int(threads)


def _study(
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
                [pb], _shift(xs), [tbs], method, "ceiling", seed=seed, eval_batch=eval_batch, progress=progress, **opts
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

    summary = _summary(comparisons, methods, similarity, threshold, n_boot, seed, timings)
    localisation = _localisation(comparisons, methods, n_boot, seed) if masks is not None else None
    per_class = _per_class(comparisons, summary, methods, similarity, n_boot, seed, masks is not None)
    faith_methods = (
        list(methods) if faithfulness is True else [m for m in methods if faithfulness and m in faithfulness]
    )
    faith = _faithfulness(comparisons, faith_methods, n_boot, seed) if faith_methods else None
    examples = {m: _examples(comparisons[comparisons["method"] == m], maps[m], x, masks, similarity) for m in methods}
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
                for kk, vv in _merge_options(m, {**STUDY_OPTIONS.get(m, {}), **(options or {}).get(m, {})}).items()
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
