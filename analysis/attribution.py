"""Attribution maps with Captum, one consistent call for every method, batched and seeded.

:func:`attribute` computes a map with the shape of ``inputs`` for one model;
:func:`attribute_pair` computes two (or more) models' maps on the same inputs with
the same targets, baselines and random draws, so a difference between the maps is
the models', not noise. Models are prepared with
:func:`analysis.prepare.prepare_for_attribution` (a checked copy in eval mode,
no in-place activations, one ReLU module per use).

Methods (Captum classes; logits are attributed, never softmax outputs):

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

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tunelens.core.stages import TOKEN_GRID, gradcam_layer, patch_grid, stages

from .prepare import _model_device, assert_eval, is_residual, output_dim, prepare_for_attribution

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_OPTIONS",
    "GRADIENT_METHODS",
    "METHODS",
    "STOCHASTIC_METHODS",
    "CoarseLayerWarning",
    "PairMaps",
    "attribute",
    "attribute_group",
    "attribute_pair",
    "auto_eval_batch",
    "default_gradcam_layer",
    "predictions",
    "resolve_targets",
    "token_grad_cam",
]

METHODS = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "gradient_shap",
    "occlusion",
    "grad_cam",
    "guided_backprop",
    "deeplift",
    "lrp",
)
DEFAULT_METHODS = (
    "saliency",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "gradient_shap",
    "occlusion",
    "grad_cam",
    "guided_backprop",
)
STOCHASTIC_METHODS = frozenset({"smoothgrad", "gradient_shap"})
#: Methods that read the same input gradient: saliency is its absolute value, input x gradient its product
#: with the input.
GRADIENT_METHODS = ("saliency", "input_x_gradient")


def shares_gradient(methods: Sequence[str], options: Mapping[str, Any] | None) -> bool:
    """Whether both :data:`GRADIENT_METHODS` run without options of their own, so one backward pass per model
    and input set serves both (:func:`~tunelens.analysis.attribution_study.attribution_study`)."""
    return set(GRADIENT_METHODS) <= set(methods) and not any((options or {}).get(m) for m in GRADIENT_METHODS)


#: Defaults per method (any Captum ``attribute`` keyword may be passed on top of these).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"n_steps": 32, "method": "gausslegendre"},
    "smoothgrad": {"nt_samples": 8, "noise_level": 0.15, "inner": "saliency", "nt_type": "smoothgrad"},
    "gradient_shap": {"n_samples": 8, "stdevs": 0.0},
    "occlusion": {"window": 8, "stride": 4},
    "grad_cam": {"layer": "auto", "interpolate_mode": "bilinear", "relu_attributions": False},
}

_CPU_MAX_BATCH = 256
_GPU_MAX_BATCH = 2048


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


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """torch (CPU and ``device``) and NumPy global generators seeded inside; the caller's states restored after."""
    devices = [device] if device is not None and device.type == "cuda" else []
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        try:
            yield
        finally:
            np.random.set_state(np_state)


def _chunk_seed(seed: int, start: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(start)]).generate_state(1)[0])


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
    )


def _available_ram() -> int:
    """Bytes of RAM a new allocation can have: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus the page
    cache the kernel gives back), not free memory alone (``SC_AVPHYS_PAGES``), which the page cache of any
    earlier file reads shrinks: with it, a resnet50 study at 224 px on a machine with 21 GB available but 5 GB
    free ran its attribution passes 3 images at a time instead of 14, and at 1 when less was free."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@torch.no_grad()
def _activation_bytes(model: nn.Module, x1: torch.Tensor) -> int:
    total = 0
    handles = []

    def hook(_m, _i, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    for m in model.modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(hook))
    try:
        model(x1)
    finally:
        for h in handles:
            h.remove()
    return max(total, x1.numel() * x1.element_size())


def auto_eval_batch(
    model: nn.Module, inputs: torch.Tensor, device: torch.device | None = None, memory_budget: int | None = None
) -> int:
    """Most images per forward/backward pass that fit: activation bytes per image x 3 against a memory budget.

    Budget: 60% of free GPU memory on CUDA, 25% of available RAM on CPU, unless given. Capped
    at 256 on CPU (larger batches are not faster there) and 2048 on GPU.
    """
    device = device or _model_device(model)
    per = 3 * _activation_bytes(model, inputs[:1].to(device))
    if memory_budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory_budget = int(0.6 * free)
        else:
            memory_budget = int(0.25 * _available_ram())
    cap = _GPU_MAX_BATCH if device.type == "cuda" else _CPU_MAX_BATCH
    return int(max(1, min(cap, memory_budget // max(per, 1))))


def token_grad_cam(
    model: nn.Module, layer: str, x: torch.Tensor, target: Any, *, relu_attributions: bool = False
) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on a layer whose output is tokens ``(B, N, D)`` (a ViT block): the
    ``prefix_tokens`` of the model's stage map (class/register tokens) are dropped, the channel weights are the
    patch-mean gradients of the target logit, ``cam[p] = sum_d w_d * a[p, d]`` per patch token ``p``, and the
    patches are laid out on their grid: ``(B, 1, h, w)``, as ``LayerGradCam`` returns for NCHW layers (whose
    spatial mean of the gradients over an NCHW map is the same weight). Grad-CAM for ViTs follows the common
    practice (e.g. pytorch-grad-cam's ViT recipe: a block's tokens reshaped to the patch grid)."""
    prefix = stages(model, x[:1].detach()).prefix_tokens
    seen: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _i: Any, out: Any) -> None:
        seen["a"] = out[0] if isinstance(out, tuple) else out

    handle = model.get_submodule(layer).register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x)
            t = torch.as_tensor(target, device=logits.device).reshape(-1)
            t = t.expand(len(logits)) if t.numel() == 1 else t
            score = logits.gather(1, t[:, None].long()).sum()
            grad = torch.autograd.grad(score, seen["a"])[0]
    finally:
        handle.remove()
    a, g = seen["a"].detach()[:, prefix:], grad[:, prefix:]
    if a.ndim != 3:
        raise ValueError(f"token Grad-CAM needs a (B, N, D) output at {layer!r}, got shape {tuple(seen['a'].shape)}")
    cam = (a * g.mean(1, keepdim=True)).sum(-1)
    if relu_attributions:
        cam = cam.clamp(min=0)
    h, w = patch_grid(cam.shape[1], x.shape[-2:])
    return cam.reshape(len(cam), 1, h, w)


def default_gradcam_layer(model: nn.Module, inputs: torch.Tensor) -> str:
    """The last layer after the stem with an NCHW output larger than 1x1 that runs once per forward pass
    (:func:`tunelens.core.stages.gradcam_layer`: ``layer4`` on ResNets, Swin's ``permute`` back to NCHW, never
    a 1x1 pooling layer). ValueError with the reason when there is none (ViT: its blocks output tokens)."""
    return gradcam_layer(model, inputs[:1].to(_model_device(model)))


@torch.no_grad()
def predictions(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max class of the model's logits for each input (eval mode assumed), on the CPU."""
    dev = _model_device(model)
    return torch.cat(
        [model(inputs[i : i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(inputs), batch_size)]
    )


def resolve_targets(model: nn.Module, inputs: torch.Tensor, target: Any) -> torch.Tensor:
    """Target class per input as a CPU long tensor: an int, a sequence/tensor of labels, or ``"pred"``."""
    n = len(inputs)
    if target is None:
        raise ValueError(
            "a target is needed: pass the true labels (target=labels) or target='pred' for the model's own prediction"
        )
    if isinstance(target, str):
        if target in ("pred", "prediction", "own"):
            return predictions(model, inputs)
        raise ValueError(f"unknown target {target!r}: use labels, an int, or 'pred'")
    t = torch.as_tensor(target).long().cpu()
    if t.ndim == 0:
        return t.repeat(n)
    if t.shape != (n,):
        raise ValueError(f"target has shape {tuple(t.shape)}; expected ({n},) for {n} inputs")
    return t


def _merge_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; expected one of {', '.join(METHODS)}")
    opts = dict(DEFAULT_OPTIONS.get(method, {}))
    opts.update(options or {})
    return opts


def _outer_chunk(method: str, opts: Mapping[str, Any], eval_batch: int, remaining: int) -> int:
    if method == "gradient_shap":
        return max(1, min(remaining, eval_batch // max(1, int(opts.get("n_samples", 5)))))
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
            cost = int(opts.get("n_steps", 50)) if inner_name == "integrated_gradients" else 1
            opts.setdefault("nt_samples_batch_size", max(1, eval_batch // max(1, n * cost)))
            if inner_name == "integrated_gradients":
                opts.setdefault("internal_batch_size", max(eval_batch, n * opts["nt_samples_batch_size"]))
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
                    f"Grad-CAM layer {state['layer'] if layer_name == 'auto' else layer_name!r} is "
                    f"{h}x{w}, coarser than 4x4: its upsampled map can hardly localise anything; choose "
                    "an earlier layer (e.g. layer3) or larger inputs",
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

    The models must be prepared (:func:`analysis.prepare.prepare_for_attribution`) and on
    one device. ``targets[i]`` is the target per input of ``models[i]``. An out-of-memory
    error halves ``eval_batch`` and redoes the chunk for every model, so the draws stay
    shared. Returns one detached float tensor per model, shaped like ``inputs``, on the
    inputs' device.
    """
    opts = _merge_options(method, options)
    for m in models:
        assert_eval(m)
    dev = _model_device(models[0])
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
            cs = _chunk_seed(seed, start)
            try:
                res = [
                    _attribute_chunk(m, xs, t[start : start + size].to(dev), method, opts, b, cs, state)
                    for m, t in zip(models, targets, strict=False)
                ]
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                if not _is_oom(e) or b == 1:
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
    (:func:`analysis.prepare.prepare_for_attribution`), so it is left unchanged.
    """
    dev = torch.device(device) if device is not None else _model_device(model)
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
    dev = torch.device(device) if device is not None else _model_device(tuned)
    pb = prepare_for_attribution(base, inputs, device=dev)
    pt = prepare_for_attribution(tuned, inputs, device=dev)
    if output_dim(pb, inputs) != output_dim(pt, inputs):
        raise ValueError(
            f"the models answer different questions ({output_dim(pb, inputs)} vs "
            f"{output_dim(pt, inputs)} classes): give the base model a probe head for the tuned "
            "model's classes first (analysis.prepare.fit_probe_head), or use attribution_study "
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
        used[method] = _merge_options(method, opts)
    return PairMaps(maps=maps, target_base=tb, target_tuned=tt, seed=seed, options=used)
