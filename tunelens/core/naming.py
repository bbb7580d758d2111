"""Layer and stage naming: the classification head, the stage a parameter belongs to, stage order.

Shared by fine-tuning (which stages to unfreeze) and the analyses (how to group layers).
"""

from __future__ import annotations

from torch import nn

__all__ = ["has_module", "head_name", "stage_of", "stage_order"]


def head_name(model: nn.Module) -> str:
    """Dotted name of the final classification layer (``fc``, ``classifier.2``, ``heads.head``...)."""
    for cand in ("fc", "head", "heads.head", "classifier"):
        mod = model.get_submodule(cand) if has_module(model, cand) else None
        if isinstance(mod, nn.Linear):
            return cand
        if isinstance(mod, nn.Sequential):
            lin = [n for n, m in mod.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))]
            if lin:
                return f"{cand}.{lin[-1]}"
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to use as the classification head")
    return last[-1]


def has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def stage_of(name: str) -> str:
    """The stage a parameter or module belongs to: ``stem`` (conv1/bn1), ``layerN``, ``head`` (fc), or its
    top-level block (``features.3`` for ``features.3.0.weight``, ``encoder.layers.encoder_layer_2``,
    ``encoder.layer.3`` for a BERT-family layer, ``embeddings`` ...)."""
    parts = name.split(".")
    top = parts[0]
    if top in ("conv1", "bn1", "relu", "maxpool"):
        return "stem"
    if top in ("fc", "head", "heads", "classifier"):
        return "head"
    if top == "features" and len(parts) > 1 and parts[1].isdigit():
        return f"features.{parts[1]}"
    if top == "encoder" and len(parts) > 2 and parts[1] in ("layers", "layer"):  # ViT / BERT-family encoders
        return f"encoder.{parts[1]}.{parts[2]}"
    return top


def stage_order(model: nn.Module) -> list[str]:
    """Stages of ``model`` in parameter (forward) order."""
    return list(dict.fromkeys(stage_of(n) for n, _ in model.named_parameters()))
