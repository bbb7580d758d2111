"""Attribution maps with Captum, one consistent call for every method, batched and seeded.

:func:`attribute` computes a map with the shape of ``inputs`` for one model;
:func:`attribute_pair` computes two (or more) models' maps on the same inputs with
the same targets, baselines and random draws, so a difference between the maps is
the models', not noise. Models are prepared with
:func:`tunelens.analysis.measures.attribution.prepare.prepare_for_attribution` (a checked copy in eval mode,
no in-place activations, one ReLU module per use).

Methods (Captum classes; logits are attributed, never softmax outputs; each is declared in
:mod:`tunelens.analysis.measures.attribution.methods`):

``saliency``            |d logit / d x| (Simonyan et al. 2014), ``Saliency``
``input_x_gradient``    x * d logit / d x (Shrikumar et al. 2016), ``InputXGradient``
``integrated_gradients`` (Sundararajan et al. 2017), ``IntegratedGradients``; zero baseline
``smoothgrad``          ``NoiseTunnel`` over an inner method, saliency by default (Smilkov et al. 2017)
``gradient_shap``       ``GradientShap`` (Lundberg & Lee 2017, expected gradients)
``occlusion``           ``Occlusion`` (Zeiler & Fergus 2014); zero (= mean colour) patches
``grad_cam``            ``LayerGradCam`` at a chosen layer (Selvaraju et al. 2017), upsampled to the input
``guided_backprop``     ``GuidedBackprop`` (Springenberg et al. 2015)
``deeplift``            ``DeepLift`` (Shrikumar et al. 2017), zero baseline (extra, not a default)
``lrp``                 ``LRP`` (Bach et al. 2015) for non-residual networks only: its relevance does not
                        conserve across a residual add, so residual networks are refused

Batching: one knob, ``eval_batch`` (the most images in one forward/backward pass),
chosen from the model's activation memory when not given, and halved on an
out-of-memory error (the chunk is redone for every model of the group). It sets
Integrated Gradients' ``internal_batch_size``, NoiseTunnel's ``nt_samples_batch_size``
and Occlusion's ``perturbations_per_eval``.

Randomness: SmoothGrad noise and GradientShap's baseline and path draws come from
torch's and NumPy's global generators, which are seeded per chunk (from ``seed`` and the
chunk's position) inside a forked RNG state, so the caller's random state is untouched
and every model of a group sees the same draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tunelens.analysis.measures.attribution.batching import auto_eval_batch, chunk_seed, is_oom, seeded
from tunelens.analysis.measures.attribution.gradcam import default_gradcam_layer, finer_layer_hint, token_grad_cam
from tunelens.analysis.measures.attribution.methods import (
    DEFAULT_OPTIONS,
    GRADIENT_METHODS,
    METHODS,
    STOCHASTIC_METHODS,
)
from tunelens.analysis.measures.attribution.prepare import assert_eval, is_residual, output_dim, prepare_for_attribution
from tunelens.analysis.measures.attribution.targets import resolve_targets
from tunelens.core.models import model_device
from tunelens.core.stages import TOKEN_GRID

__all__ = [
    "CoarseLayerWarning",
    "PairMaps",
    "attribute",
    "attribute_group",
    "attribute_pair",
    "merge_options",
    "shares_gradient",
]


def shares_gradient(methods: Sequence[str], options: Mapping[str, Any] | None) -> bool:
    """Whether both :data:`GRADIENT_METHODS` run without options of their own, so one backward pass per model
    and input set serves both (:func:`~tunelens.analysis.measures.attribution.study.attribution_study`)."""
    return set(GRADIENT_METHODS) <= set(methods) and not any((options or {}).get(m) for m in GRADIENT_METHODS)


class CoarseLayerWarning(UserWarning):
    """Grad-CAM at a layer whose spatial map is coarser than 4x4."""


@dataclass
class PairMaps:
    """Maps of two models on the same inputs: ``maps[method] = (base_map, tuned_map)``; targets used per model."""

    maps: dict[str, tuple[torch.Tensor, torch.Tensor]]
    target_base: torch.Tensor
    target_tuned: torch.Tensor
    seed: int
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.maps[method]

    def __iter__(self):
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)


def merge_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``method``'s :data:`~tunelens.analysis.measures.attribution.methods.DEFAULT_OPTIONS` updated by ``options``
    (an unknown method is refused)."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; expected one of {', '.join(METHODS)}")
    opts = dict(DEFAULT_OPTIONS.get(method, {}))
    opts.update(options or {})
    return opts


def _outer_chunk(method: str, opts: Mapping[str, Any], eval_batch: int, remaining: int) -> int:
    """Images per call. A stochastic method runs one image per call, seeded by that image's position
    (:func:`~tunelens.analysis.measures.attribution.batching.chunk_seed`), with all its noise samples in one
    draw: its maps then do not depend on ``eval_batch`` (which follows the memory available), only on the seed."""
    if method in STOCHASTIC_METHODS:
        return 1
    return max(1, min(remaining, eval_batch))


def _occlusion_args(opts: dict[str, Any], channels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    win = opts.pop("sliding_window_shapes", None)
    stride = opts.pop("strides", None)
    w = opts.pop("window", 8)
    s = opts.pop("stride", 4)
    if win is None:
        win = (channels, w, w) if isinstance(w, int) else (channels, *w)
    if stride is None:
        stride = (channels, s, s) if isinstance(s, int) else (channels, *s)
    return tuple(win), stride


# ----------------------------------------------------------------------------------------------
# one chunk of one model
# ----------------------------------------------------------------------------------------------


def _attribute_chunk(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    method: str,
    opts: dict[str, Any],
    eval_batch: int,
    seed: int,
    state: dict[str, Any],
) -> torch.Tensor:
    import captum.attr as ca

    opts = dict(opts)
    n = len(x)
    if method != "occlusion":
        x = x.detach().clone().requires_grad_(True)
    with seeded(seed, x.device), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        warnings.filterwarnings("ignore", message="Setting forward, backward hooks and attributes on non-linear")
        if method == "saliency":
            return ca.Saliency(model).attribute(x, target=target, **opts)
        if method == "input_x_gradient":
            return ca.InputXGradient(model).attribute(x, target=target, **opts)
        if method == "integrated_gradients":
            opts.setdefault("internal_batch_size", max(eval_batch, n))
            return ca.IntegratedGradients(model).attribute(x, target=target, **opts)
        if method == "deeplift":
            return ca.DeepLift(model).attribute(x, target=target, **opts)
        if method == "smoothgrad":
            inner_name = opts.pop("inner", "saliency")
            inner = {
                "saliency": ca.Saliency,
                "input_x_gradient": ca.InputXGradient,
                "integrated_gradients": ca.IntegratedGradients,
                "guided_backprop": ca.GuidedBackprop,
            }
            if inner_name not in inner:
                raise ValueError(f"smoothgrad's inner method must be one of {sorted(inner)}, got {inner_name!r}")
            opts.pop("noise_level", None)
            opts["stdevs"] = float(state["stdevs"]) if "stdevs" not in opts else opts["stdevs"]
            # every noise sample in one draw (batched draws would depend on the batch): memory n x nt_samples
            if inner_name == "integrated_gradients":
                opts.setdefault("internal_batch_size", max(eval_batch, n * int(opts.get("nt_samples", 5))))
            return ca.NoiseTunnel(inner[inner_name](model)).attribute(x, target=target, **opts)
        if method == "gradient_shap":
            baselines = opts.pop("baselines", None)
            if baselines is None:
                baselines = torch.zeros((1, *x.shape[1:]), device=x.device, dtype=x.dtype)
            return ca.GradientShap(model).attribute(x, baselines=baselines.to(x.device), target=target, **opts)
        if method == "occlusion":
            win, stride = _occlusion_args(opts, x.shape[1])
            opts.setdefault("perturbations_per_eval", max(1, eval_batch // n))
            with torch.no_grad():
                return ca.Occlusion(model).attribute(
                    x, sliding_window_shapes=win, strides=stride, target=target, **opts
                )
        if method == "grad_cam":
            layer_name = opts.pop("layer", "auto")
            mode = opts.pop("interpolate_mode", "bilinear")
            chosen = state["layer"] if layer_name == "auto" else layer_name
            if chosen.endswith(TOKEN_GRID):
                cam = token_grad_cam(model, chosen[: -len(TOKEN_GRID)], x, target, **opts)
            else:
                cam = ca.LayerGradCam(model, model.get_submodule(chosen)).attribute(x, target=target, **opts)
            if cam.ndim != 4:
                raise ValueError(
                    f"grad_cam needs a layer with a spatial output; {layer_name!r} gave shape {tuple(cam.shape)}"
                )
            h, w = cam.shape[-2:]
            if (h < 4 or w < 4) and not state.get("warned"):
                state["warned"] = True
                warnings.warn(
                    f"Grad-CAM layer {chosen!r} is {h}x{w}, coarser than 4x4: its upsampled map can hardly "
                    f"localise anything; {finer_layer_hint(model, x)}",
                    CoarseLayerWarning,
                    stacklevel=4,
                )
            up = ca.LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode=mode)
            return (up / x.shape[1]).expand(-1, x.shape[1], -1, -1)
        if method == "guided_backprop":
            return ca.GuidedBackprop(model).attribute(x, target=target, **opts)
        if method == "lrp":
            if is_residual(model):
                raise ValueError(
                    "Captum's LRP is not offered for residual networks: its relevance does not "
                    "conserve across the residual add, so the maps would not mean what LRP promises"
                )
            return ca.LRP(model).attribute(x, target=target, **opts)
    raise ValueError(f"unknown attribution method {method!r}")


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def attribute_group(
    models: Sequence[nn.Module],
    inputs: torch.Tensor,
    targets: Sequence[torch.Tensor],
    method: str,
    *,
    seed: int = 0,
    eval_batch: int | None = None,
    progress: bool = False,
    desc: str | None = None,
    **options: Any,
) -> list[torch.Tensor]:
    """Maps of several prepared models on the same inputs, chunk by chunk with the same seeds.

    The models must be prepared (:func:`tunelens.analysis.measures.attribution.prepare.prepare_for_attribution`) and on
    one device. ``targets[i]`` is the target per input of ``models[i]``. An out-of-memory
    error halves ``eval_batch`` and redoes the chunk for every model, so the draws stay
    shared. Returns one detached float tensor per model, shaped like ``inputs``, on the
    inputs' device.
    """
    opts = merge_options(method, options)
    for m in models:
        assert_eval(m)
    dev = model_device(models[0])
    n = len(inputs)
    state: dict[str, Any] = {}
    if method == "smoothgrad" and "stdevs" not in opts:
        rng = float((inputs.max() - inputs.min()).item()) if n else 1.0
        state["stdevs"] = float(opts.get("noise_level", 0.15)) * rng
    if method == "grad_cam" and opts.get("layer", "auto") == "auto":
        state["layer"] = default_gradcam_layer(models[0], inputs)
    if eval_batch is None:
        eval_batch = min(auto_eval_batch(m, inputs, dev) for m in models) if n else 1
    outs = [torch.empty(inputs.shape, dtype=torch.float32, device=inputs.device) for _ in models]
    start, b = 0, int(eval_batch)
    with tqdm(total=n, desc=desc or method, disable=not progress, leave=False) as bar:
        while start < n:
            size = _outer_chunk(method, opts, b, n - start)
            xs = inputs[start : start + size].to(dev)
            cs = chunk_seed(seed, start)
            try:
                res = [
                    _attribute_chunk(m, xs, t[start : start + size].to(dev), method, opts, b, cs, state)
                    for m, t in zip(models, targets, strict=False)
                ]
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                if not is_oom(e) or b == 1:
                    raise
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                b = max(1, b // 2)
                warnings.warn(f"{method}: out of memory; retrying with {b} images per pass", stacklevel=2)
                continue
            for o, r in zip(outs, res, strict=False):
                o[start : start + size] = r.detach().float().to(inputs.device)
            start += size
            bar.update(size)
    return outs


def attribute(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Any = None,
    method: str = "integrated_gradients",
    *,
    seed: int = 0,
    eval_batch: int | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    **options: Any,
) -> torch.Tensor:
    """Attribution map of ``model``'s logit ``target`` for ``inputs``, shaped like ``inputs``.

    ``method`` is one of :data:`METHODS`; ``options`` go to the Captum method (on top of
    :data:`DEFAULT_OPTIONS`), plus these of ours: ``grad_cam``: ``layer`` (module name,
    ``"auto"`` = ``layer4`` on ResNets) and ``interpolate_mode`` (upsampling; the map is
    spread evenly over the input channels, so the channel sum is the Grad-CAM map);
    ``smoothgrad``: ``inner`` (the smoothed method, ``saliency`` by default) and
    ``noise_level`` (noise std as a fraction of the inputs' range, Smilkov et al. 2017,
    unless ``stdevs`` is given); ``occlusion``: ``window`` and ``stride`` (square, in pixels,
    unless Captum's ``sliding_window_shapes``/``strides`` are given); ``gradient_shap``:
    ``baselines`` (a distribution of reference inputs; zeros by default).

    ``target``: true labels (sequence or tensor), one int for all, or ``"pred"`` for the
    model's own prediction. The model is prepared for attribution on a copy
    (:func:`tunelens.analysis.measures.attribution.prepare.prepare_for_attribution`), so it is left unchanged.
    """
    dev = torch.device(device) if device is not None else model_device(model)
    prepared = prepare_for_attribution(model, inputs, device=dev)
    t = resolve_targets(prepared, inputs, target)
    return attribute_group(
        [prepared], inputs, [t], method, seed=seed, eval_batch=eval_batch, progress=progress, **options
    )[0]


def attribute_pair(
    base: nn.Module,
    tuned: nn.Module,
    inputs: torch.Tensor,
    target: Any = None,
    methods: Sequence[str] = ("integrated_gradients",),
    *,
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    eval_batch: int | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    targets: Any = None,
) -> PairMaps:
    """Both models' maps on the same inputs, targets, baselines and random draws.

    ``target``: true labels (used for both models), ``"pred"`` (each model its own
    prediction), or a ``(base_target, tuned_target)`` pair (``targets=`` is the deprecated
    spelling of the same argument). ``options[method]`` are the
    per-method options of :func:`attribute`. Both models use one batch plan (the smaller
    of the two models' memory-derived batch sizes), so SmoothGrad's noise and GradientShap's
    baselines and path points are drawn identically for the two.
    """
    if targets is not None:
        warnings.warn("attribute_pair(targets=...) is deprecated: use target=", DeprecationWarning, stacklevel=2)
        target = targets
    if target is None:
        raise TypeError("attribute_pair needs target: the class indices to attribute, or 'pred'")
    targets = target
    dev = torch.device(device) if device is not None else model_device(tuned)
    pb = prepare_for_attribution(base, inputs, device=dev)
    pt = prepare_for_attribution(tuned, inputs, device=dev)
    if output_dim(pb, inputs) != output_dim(pt, inputs):
        raise ValueError(
            f"the models answer different questions ({output_dim(pb, inputs)} vs "
            f"{output_dim(pt, inputs)} classes): give the base model a probe head for the tuned "
            "model's classes first (tunelens.analysis.measures.attribution.probe_head.fit_probe_head), or use attribution_study "
            "with probe_data"
        )
    if isinstance(targets, tuple) and len(targets) == 2 and not isinstance(targets[0], (int, np.integer)):
        tb, tt = resolve_targets(pb, inputs, targets[0]), resolve_targets(pt, inputs, targets[1])
    else:
        tb, tt = resolve_targets(pb, inputs, targets), resolve_targets(pt, inputs, targets)
    if eval_batch is None and len(inputs):
        eval_batch = min(auto_eval_batch(pb, inputs, dev), auto_eval_batch(pt, inputs, dev))
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    used: dict[str, dict[str, Any]] = {}
    for method in methods:
        opts = dict((options or {}).get(method, {}))
        a, b = attribute_group(
            [pb, pt], inputs, [tb, tt], method, seed=seed, eval_batch=eval_batch, progress=progress, **opts
        )
        maps[method] = (a, b)
        used[method] = merge_options(method, opts)
    return PairMaps(maps=maps, target_base=tb, target_tuned=tt, seed=seed, options=used)
