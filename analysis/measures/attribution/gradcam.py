"""Grad-CAM's layer: the default one of a model, and Grad-CAM on a layer that outputs tokens (a ViT block)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelens.core.models import model_device
from tunelens.core.stages import gradcam_layer, patch_grid, stages

__all__ = ["default_gradcam_layer", "finer_layer_hint", "token_grad_cam"]


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


def finer_layer_hint(model: nn.Module, inputs: torch.Tensor) -> str:
    """What to do about a Grad-CAM layer coarser than 4x4, naming layers of ``model`` itself (its stage map,
    :func:`tunelens.core.stages.stages`, at the input size of ``inputs``): the output of the last stage whose map
    is at least 4x4, or, when there is none, larger inputs."""
    try:
        smap = stages(model, inputs[:1].to(model_device(model)))
    except Exception:  # a model the stage map cannot trace: no layer names to offer
        return "choose an earlier layer with a spatial output (the layer= option of grad_cam) or larger inputs"
    finer = [
        s
        for s in smap.body
        if s.layout == "nchw" and s.output and s.resolution and len(s.resolution) == 2 and min(s.resolution) >= 4
    ]
    if not finer:
        return "no layer of this model after the stem is 4x4 or finer at this input size: use larger inputs"
    pick = finer[-1]
    h, w = pick.resolution or (0, 0)
    return (
        f"choose an earlier layer of this model (the layer= option of grad_cam), e.g. {pick.output!r} (the output of stage "
        f"{pick.name}, {h}x{w} at this input size), or larger inputs"
    )


def default_gradcam_layer(model: nn.Module, inputs: torch.Tensor) -> str:
    """The last layer after the stem with an NCHW output larger than 1x1 that runs once per forward pass
    (:func:`tunelens.core.stages.gradcam_layer`: ``layer4`` on ResNets, Swin's ``permute`` back to NCHW, never
    a 1x1 pooling layer). ValueError with the reason when there is none (ViT: its blocks output tokens)."""
    return gradcam_layer(model, inputs[:1].to(model_device(model)))
