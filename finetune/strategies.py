"""Fine-tuning strategies: which parameters train, and which stay exactly as pretrained.

* ``linear_probe``: freeze everything, replace and train the head (the classic recipe).
* ``full``: every parameter trains.
* ``last_k``: the last ``k`` stages (:func:`tunelens.core.stages.stages`; the stem counts as one) and the head
  train; earlier stages are frozen.
* ``lp_ft``: a linear probe first, then full fine-tuning from the probed head
  (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
  Out-of-Distribution").
* ``lora``: low-rank adapters on chosen stages plus the new head (:mod:`tunelens.finetune.lora`
  injects them; every other parameter, BatchNorm included, stays frozen).
* ``scratch``: the from-scratch control: random initialisation, every parameter trains.

Frozen modules are also kept in eval mode, so BatchNorm running statistics of a
frozen backbone stay those of pretraining (otherwise a "frozen" linear probe still
changes the features it probes).
"""

from __future__ import annotations

import torch
from torch import nn

from tunelens.core.naming import head_name
from tunelens.core.stages import stages

__all__ = ["STRATEGIES", "apply_freeze", "set_train_mode", "stage_names", "trainable_prefixes"]

STRATEGIES = ("linear_probe", "full", "last_k", "lp_ft", "lora", "scratch")


def stage_names(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """The model's stages in forward order (:func:`tunelens.core.stages.stages`: ``stem``, ``layer1`` ..
    ``layer4``, ``head`` for ResNets) that hold parameters."""
    smap = stages(model, example)
    return [s.name for s in smap.stages if any(True for _ in _params_of(model, s.modules))]


def _params_of(model: nn.Module, modules: tuple[str, ...]):
    for m in modules:
        yield from model.get_submodule(m).parameters()


def trainable_prefixes(model: nn.Module, strategy: str, k: int = 1) -> list[str] | None:
    """Module-name prefixes that train under ``strategy``; ``None`` means everything."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    head = head_name(model)
    if strategy in ("full", "scratch"):
        return None
    if strategy in ("linear_probe", "lp_ft"):  # lp_ft starts with its probe phase
        return [head]
    if strategy == "lora":
        adapters = [n for n, _ in model.named_modules() if n.endswith((".lora_A", ".lora_B"))]
        if not adapters:
            raise ValueError("the lora strategy trains injected adapters: wrap the model with finetune.lora.add_lora")
        return adapters + [head]
    smap = stages(model)
    body = [s.name for s in smap.stages if s.kind != "head" and s.name in stage_names(model)]
    if k < 1 or k > len(body):
        raise ValueError(f"last_k needs 1 <= k <= {len(body)} (the model's stages: {', '.join(body)}), got {k}")
    return [m for name in body[-k:] for m in smap.stage(name).modules] + [head]


def _matches(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def apply_freeze(model: nn.Module, prefixes: list[str] | None) -> list[str]:
    """Set ``requires_grad`` so that only parameters under ``prefixes`` train. Returns their names."""
    names = []
    for n, p in model.named_parameters():
        p.requires_grad_(prefixes is None or _matches(n, prefixes))
        if p.requires_grad:
            names.append(n)
    return names


def set_train_mode(model: nn.Module, prefixes: list[str] | None) -> None:
    """Train mode for trainable parts, eval mode for frozen ones (BatchNorm stats stay put)."""
    model.train()
    if prefixes is None:
        return
    for n, m in model.named_modules():
        if n and not _matches(n, prefixes) and not any(p.startswith(n + ".") for p in prefixes):
            m.eval()
