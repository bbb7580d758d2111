"""Did fine-tuning change where the model looks? Base-vs-tuned attribution maps, calibrated.

:func:`attribution_study` computes, for each attribution method, the maps of the base
and the fine-tuned model on the same images (same targets, baselines and random
draws), compares them per image (:func:`tunelens.analysis.measures.attribution.map_metrics.compare_maps`), checks them
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
on ``probe_data`` (:func:`tunelens.analysis.measures.attribution.probe_head.fit_probe_head`), so both models answer the
same question; :attr:`AttributionStudy.notes` says so.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tunelens.analysis.measures.attribution.examples import AttributionExamples
from tunelens.analysis.measures.attribution.methods import DEFAULT_METHODS
from tunelens.analysis.measures.attribution.stats import bootstrap_ci, change_index
from tunelens.analysis.measures.attribution.study_run import AttributionStudy, collect_images, run_study

__all__ = [
    "AttributionExamples",
    "AttributionStudy",
    "attribution_study",
    "bootstrap_ci",
    "change_index",
    "collect_images",
]


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
    per-method options on top of :data:`~tunelens.analysis.measures.attribution.methods.STUDY_OPTIONS`. ``similarity``: the similarity
    of the change index (one of :data:`tunelens.analysis.measures.attribution.map_metrics.SIMILARITIES`); ``threshold``: the
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
        return run_study(
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
