"""Forward hooks that are always removed: :class:`ActivationCapture`.

It hooks exact module names (never loose matches), hands each output to a callback
*inside the hook* (so a later in-place op such as torchvision's ``ReLU(inplace=True)``
cannot overwrite what was seen), refuses modules that fire more than once per forward
pass (torchvision's ``BasicBlock.relu`` runs twice: its activations would silently mix),
and removes its hooks on exit, even on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["ActivationCapture", "apply_view", "split_view"]

#: Views of a module's output, written after its name: ``encoder.ln[cls]``. ``nhwc``: a channels-last map
#: (Swin) as NCHW; ``cls``: token 0 of ``(B, N, D)`` tokens; ``patch_mean``: the mean of tokens 1..N-1
#: (``patch_mean:K`` after K prefix tokens); ``mean``: the mean of every token.
VIEWS = ("nhwc", "cls", "patch_mean", "mean")


def split_view(name: str) -> tuple[str, str | None]:
    """``("encoder.ln", "cls")`` for ``"encoder.ln[cls]"``; ``(name, None)`` for a plain module name."""
    if name.endswith("]") and "[" in name:
        base, view = name[:-1].split("[", 1)
        if view.split(":")[0] not in VIEWS:
            raise ValueError(f"unknown view [{view}] in layer {name!r}; views: {', '.join(VIEWS)}")
        return base, view
    return name, None


def apply_view(out: torch.Tensor, view: str | None) -> torch.Tensor:
    """``out`` seen through ``view`` (see :data:`VIEWS`)."""
    if view is None:
        return out
    kind, _, arg = view.partition(":")
    if kind == "nhwc":
        return out.permute(0, 3, 1, 2)
    if out.ndim != 3:
        raise ValueError(f"view [{view}] needs token outputs (B, N, D), got shape {tuple(out.shape)}")
    if kind == "cls":
        return out[:, 0]
    if kind == "mean":
        return out.mean(1)
    return out[:, int(arg or 1) :].mean(1)


class ActivationCapture:
    """Context manager that hooks ``layers`` of ``model`` and calls ``fn(layer_name, output)`` inside each hook.

    A layer is a module name, optionally with a view of its output (``encoder.ln[cls]``, see :data:`VIEWS`).

    ``fn`` runs before any later in-place operation can change the output. When ``fn``
    is None the outputs are *copied* (``detach().clone()``) into :attr:`features`.
    A module that fires twice within one forward pass raises ``RuntimeError``.
    Hooks are removed on exit, always.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], fn: Callable[[str, torch.Tensor], None] | None = None):
        self.model = model
        self.layers = list(layers)
        self.fn = fn
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._calls[name] > 1:
                raise RuntimeError(
                    f"module {name!r} ran {self._calls[name]} times in one forward pass, so its activations "
                    "would mix different points of the network (torchvision's BasicBlock.relu is used twice). "
                    "Capture the enclosing block or a module that runs once instead."
                )
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"module {name!r} returned {type(out).__name__}, not a tensor")
            out = apply_view(out, split_view(name)[1])
            if self.fn is not None:
                self.fn(name, out.detach())
            else:
                self.features[name] = out.detach().clone()

        return hook

    def _reset(self, *_):
        self._calls.clear()

    def __enter__(self) -> ActivationCapture:
        mods = dict(self.model.named_modules())
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._reset))
            for name in self.layers:
                module = split_view(name)[0]
                if module not in mods:
                    raise ValueError(f"layer {name!r} is not a module of {type(self.model).__name__}")
                self._handles.append(mods[module].register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.remove()
