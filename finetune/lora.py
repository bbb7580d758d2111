"""The ``lora`` strategy: low-rank adapters (``peft``) on the convolutions and linear layers of chosen stages.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) keeps a
pretrained weight ``W0`` (``out x in``; a conv kernel read as ``out x in*k*k``) frozen and trains
``W = W0 + (alpha / r) * B A`` with ``A`` (``r x in``, for a conv: an ``r``-channel conv with the layer's
kernel) and ``B`` (``out x r``, a 1x1 conv), ``B = 0`` at the start, so the update ``W - W0`` has rank at
most ``r``. Every ``nn.Conv2d`` and ``nn.Linear`` of the configured stages (the stages of :func:`tunelens.core.stages.stages`:
``stem``, ``layer1`` ..) gets an adapter, except the head, which is new and trains fully
(``modules_to_save``). Everything else is frozen, BatchNorm included (it stays in eval mode, so its
running statistics stay those of pretraining and the merged update is purely low-rank).

After training the adapters are merged (``merge_and_unload``): the checkpoint is a plain model of the
architecture like every other one; the adapter is saved beside it as ``peft`` saves it
(``adapter_config.json`` + ``adapter_model.safetensors``), so ``tunelens compare --tuned DIR`` reads it.

``peft`` imports ``transformers`` (seconds): it is imported only when a LoRA model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from tunelens.core.naming import head_name
from tunelens.core.stages import stages as stage_map

__all__ = ["LORA_KEYS", "add_lora", "is_lora_model", "lora_module_names", "lora_targets", "merge_lora", "save_adapter"]

LORA_KEYS = ("rank", "alpha", "stages")  # the lora section's own keys (not training-loop settings)


def lora_targets(model: nn.Module, stages: list[str]) -> list[str]:
    """Names of the ``nn.Conv2d`` / ``nn.Linear`` modules of ``model`` in ``stages``, the head excluded."""
    head = head_name(model)
    smap = stage_map(model)
    layers = [n for n, m in model.named_modules() if n and n != head and isinstance(m, nn.Conv2d | nn.Linear)]
    of = {n: smap.stage_of(n) for n in layers}
    known = [s for s in dict.fromkeys(of.values()) if s != "head"]
    bad = [s for s in stages if s not in known]
    if bad:
        raise ValueError(
            f"finetune.lora.stages: {', '.join(map(repr, bad))} is not a stage with convolutions or linear layers "
            f"of this model (the head always trains fully); choose from {', '.join(known)}"
        )
    return [n for n in layers if of[n] in stages]


def add_lora(model: nn.Module, rank: int, alpha: float, stages: list[str], seed: int = 0) -> Any:
    """Wrap ``model`` (its new head already in place) in a ``peft`` LoRA model; returns the ``PeftModel``.

    ``model`` itself is changed in place (adapters injected, the head wrapped); train it directly
    (``peft_model.base_model.model is model``) under the ``lora`` strategy. ``seed`` fixes ``A``'s
    initialisation (``B`` starts at zero)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"finetune.lora.rank must be at least 1, got {rank}")
    targets = lora_targets(model, stages)
    if not targets:
        raise ValueError(f"finetune.lora.stages {stages}: no convolution or linear layer to adapt")
    cfg = LoraConfig(
        r=rank,
        lora_alpha=cast(Any, alpha),  # annotated int in peft; used as a float scale alpha / r
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=[head_name(model)],
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def lora_module_names(model: nn.Module) -> list[str]:
    """The adapter modules (``...lora_A``, ``...lora_B``) of a model with injected LoRA layers."""
    return [n for n, _ in model.named_modules() if n.endswith((".lora_A", ".lora_B"))]


def is_lora_model(model: nn.Module) -> bool:
    return bool(lora_module_names(model))


def save_adapter(peft_model: Any, folder: str | Path) -> Path:
    """Write the adapter as ``peft`` does (``adapter_config.json``, ``adapter_model.safetensors``)."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def merge_lora(peft_model: Any) -> nn.Module:
    """The plain model with ``W0 + (alpha/r) B A`` merged into each adapted weight and the trained head in place."""
    return peft_model.merge_and_unload()
