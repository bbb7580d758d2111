"""Cleaning up state dicts: the nested layouts training scripts save, wrapper prefixes, renamed keys."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tunelens.analysis.io.safe_load import CheckpointLoadError

__all__ = ["NESTED_KEYS", "check_finite", "dtype_mismatch", "extract_state_dict", "strip_prefixes"]

#: Keys under which checkpoints nest the model's state dict, in order of preference.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "model_ema", "ema")


def _is_tensor_map(m: Any) -> bool:
    return isinstance(m, Mapping) and len(m) > 0 and all(isinstance(v, torch.Tensor) for v in m.values())


def extract_state_dict(obj: Any, path: Path, where: str = "") -> dict[str, torch.Tensor]:
    loc = f" (under {where})" if where else ""
    if isinstance(obj, torch.Tensor):
        raise CheckpointLoadError(
            f"{path} is not a checkpoint: it holds a single tensor of shape {tuple(obj.shape)}, "
            "not a mapping of parameter names to tensors (a state dict)"
        )
    if not isinstance(obj, Mapping):
        raise CheckpointLoadError(
            f"{path} is not a checkpoint: it holds a {type(obj).__name__}{loc}, expected a "
            "mapping of parameter names to tensors (save it with torch.save(model.state_dict(), "
            "...))"
        )
    if _is_tensor_map(obj):
        return dict(obj)
    for key in NESTED_KEYS:
        if key in obj and isinstance(obj[key], Mapping) and obj[key]:
            try:
                return extract_state_dict(obj[key], path, f"{where}[{key!r}]")
            except CheckpointLoadError:
                continue
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    nested = [k for k, v in obj.items() if isinstance(v, Mapping) and _contains_tensors(v)]
    if tensors:
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise CheckpointLoadError(
            f"{path} is not a clean state dict{loc}: entry {bad!r} is a "
            f"{type(obj[bad]).__name__}, not a tensor (beside {len(tensors)} tensors); save "
            "model.state_dict() alone"
        )
    if len(nested) == 1:
        return extract_state_dict(obj[nested[0]], path, f"{where}[{nested[0]!r}]")
    if len(nested) > 1:
        raise CheckpointLoadError(
            f"{path} holds several sets of tensors{loc} ({', '.join(map(repr, nested[:5]))}) "
            "and none under a usual name (state_dict, model): save the model's state dict alone"
        )
    keys = ", ".join(map(repr, list(obj)[:6]))
    raise CheckpointLoadError(
        f"{path} is not a checkpoint: it holds no tensors{loc}"
        + (f" (its entries: {keys})" if keys else " (it is empty)")
    )


def _contains_tensors(m: Mapping, depth: int = 0) -> bool:
    if depth > 4:
        return False
    return any(
        isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _contains_tensors(v, depth + 1)) for v in m.values()
    )


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(not isinstance(k, str) for k in sd):
        bad = next(k for k in sd if not isinstance(k, str))
        raise CheckpointLoadError(f"state dict key {bad!r} is not a string: this is not a model's state dict")
    out = {re.sub(r"(^|\.)_orig_mod\.", r"\1", k): v for k, v in sd.items()}
    while out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def check_finite(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [
        k
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor)
        and (v.is_floating_point() or v.is_complex())
        and not bool(torch.isfinite(v).all())
    ]


def dtype_mismatch(state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> str | None:
    """Where a tensor is not floating-point but the model's is (``load_state_dict`` would cast an int64 or bool
    tensor into float weights without a word), the words that say so; None when every dtype fits. Such a
    file is not a checkpoint of this model's trained weights."""
    bad = [
        k
        for k, v in state_dict.items()
        if k in reference
        and isinstance(v, torch.Tensor)
        and reference[k].is_floating_point()
        and not (v.is_floating_point() or v.is_complex())
    ]
    if not bad:
        return None
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return (
        f"holds {state_dict[bad[0]].dtype} tensors where the model has floating-point weights ({bad[0]}{more}): "
        "it is not a checkpoint of trained weights"
    )


_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def align_keys(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename keys to fit the model: a prefix every key shares (``model.``, ``backbone.``), old DenseNet names."""

    def overlap(d):
        return len(model_keys.intersection(d))

    best = sd
    cur = sd
    for _ in range(3):
        firsts = {k.split(".", 1)[0] for k in cur}
        if len(firsts) != 1 or not all("." in k for k in cur):
            break
        p = next(iter(firsts)) + "."
        cur = {k[len(p) :]: v for k, v in cur.items()}
        if overlap(cur) > overlap(best):
            best = cur
    if any(_DENSENET.match(k) for k in best) and overlap(best) < len(best):
        renamed = {(_DENSENET.sub(r"\1\2", k)): v for k, v in best.items()}
        if overlap(renamed) > overlap(best):
            best = renamed
    return best


def diff_keys(
    sd: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], skip: str | None = None
) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """The keys of ``ref`` missing from ``sd``, the keys of ``sd`` not in ``ref`` and the keys whose shapes differ ``(key, shape in sd, shape in ref)``; keys under ``skip`` (a module name) are ignored."""

    def ignored(k):
        return skip is not None and (k == skip or k.startswith(skip + "."))

    missing = [k for k in ref if k not in sd and not k.endswith("num_batches_tracked") and not ignored(k)]
    unexpected = [k for k in sd if k not in ref and not ignored(k)]
    shaped = [
        (k, tuple(sd[k].shape), tuple(ref[k].shape))
        for k in ref
        if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape) and not ignored(k)
    ]
    return missing, unexpected, shaped
