"""Layer and stage naming: the classification head, the stage a parameter belongs to, stage order.

Shared by fine-tuning (which stages to unfreeze) and the analyses (how to group layers).
"""

from __future__ import annotations

from torch import nn

__all__ = ["ArchitectureMismatch", "has_module", "head_name", "stage_of", "stage_order"]


class ArchitectureMismatch(ValueError):
    """Two models (or state dicts) that do not have the same parameter names."""


def head_name(model: nn.Module) -> str:
    """Dotted name of the final classification layer (``fc``, ``classifier.2``, ``heads.head``, timm's
    ``classifier``, ``head.fc``...).

    timm models name their classifier through ``get_classifier()`` (timm documentation, "Models:
    classifier"); its module is looked up by identity. Otherwise the usual torchvision names are tried,
    then the last ``nn.Linear``."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            clf = get()
        except Exception:  # a model with a get_classifier of another meaning
            clf = None
        if isinstance(clf, (nn.Linear, nn.Conv2d)):
            for n, m in model.named_modules():
                if m is clf and n:
                    return n
    for cand in ("fc", "head", "heads.head", "classifier", "head.fc"):
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


#: top-level modules of the stem: torchvision's ResNets, timm's ResNets (``act1``) and timm's
#: EfficientNet / MobileNet family (``conv_stem`` + ``bn1``)
STEM_MODULES = ("conv1", "bn1", "relu", "act1", "maxpool", "conv_stem", "embeddings")  # embeddings: BERT family
#: the 1x1 convolution after the last block of timm's EfficientNet / MobileNetV3 (before pooling)
CONV_HEAD_MODULES = ("conv_head", "bn2", "norm_head", "act2")


def stage_of(name: str) -> str:
    """The stage a parameter or module belongs to: ``stem`` (conv1/bn1, timm's conv_stem/bn1), ``layerN``,
    ``head`` (fc, classifier), or its top-level block (``features.3`` for ``features.3.0.weight``,
    ``encoder.layers.encoder_layer_2``, ``encoder.layer.3`` for a BERT-family layer (its ``embeddings`` are the stem), timm's
    ``blocks.5`` (EfficientNet stages, ViT blocks) and ``stages.2``, ``conv_head`` (timm EfficientNet's 1x1
    conv + bn2 before pooling) ...)."""
    parts = name.split(".")
    top = parts[0]
    if top in STEM_MODULES:
        return "stem"
    if top in ("fc", "head", "heads", "classifier"):
        return "head"
    if top in CONV_HEAD_MODULES:
        return "conv_head"
    if top in ("features", "blocks", "stages") and len(parts) > 1 and parts[1].isdigit():
        return f"{top}.{parts[1]}"
    if top == "encoder" and len(parts) > 2 and parts[1] in ("layers", "layer"):  # ViT / BERT-family encoders
        return f"encoder.{parts[1]}.{parts[2]}"
    return top


def stage_order(model: nn.Module) -> list[str]:
    """Stages of ``model`` in parameter (forward) order."""
    return list(dict.fromkeys(stage_of(n) for n, _ in model.named_parameters()))
