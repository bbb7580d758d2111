"""``tunelens compare``'s smoke pass: every model runs forward on two images of the data and returns logits of
shape (batch, classes), before anything is written."""

from __future__ import annotations

from typing import Any

from tunelens.compare.plan import CompareError, one_line

__all__ = ["forward_check"]


def forward_check(arch: str, models: dict[str, Any], test: Any) -> None:
    """A forward pass of every model on the first two test images; CompareError when one fails or returns
    something other than a 2-D tensor."""
    import torch

    x = torch.stack([test[i][0] for i in range(min(2, len(test)))])
    for m in models.values():
        try:
            with torch.no_grad():
                y = m(x)
        except Exception as e:
            raise CompareError(
                f"--arch {arch} cannot run on the {x.shape[-2]}x{x.shape[-1]} images of --data "
                f"({type(e).__name__}: {one_line(e)[:200]}); choose another --image-size"
            ) from None
        if not isinstance(y, torch.Tensor) or y.ndim != 2:
            raise CompareError(
                f"--arch {arch}: the model returns {type(y).__name__} "
                f"{tuple(getattr(y, 'shape', ()))}, expected logits of shape (batch, classes)"
            )
