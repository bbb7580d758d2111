"""Running a model from one stage on, fed with that stage's cached inputs: rewinding a late stage without
re-running the stages before it.

Rewinding stage ``s`` of a tuned model (:func:`tunelens.analysis.measures.interventions.rewind`) leaves every stage before ``s``
as it was, so ``s`` receives exactly what it received in the tuned model's own pass. :func:`capturing` records,
during that pass, the input of each stage's first module (a forward pre-hook, per batch, up to a memory cap);
:func:`resumed` then replaces the modules of the earlier stages by identities and feeds the first module of
``s`` its recorded input, batch by batch, so only ``s`` and what follows it run.

This relies on the stages being a chain: what reaches stage ``s`` is its first module's input and nothing else
(true of ResNets, EfficientNets, ConvNeXts and ViT encoders; not of a network whose later stages read earlier
outputs directly). :func:`resumable` checks it per stage before use: the resumed model, with its weights
unchanged, must reproduce the recorded logits of a few samples; a stage that fails (or raises) is re-run from the
input instead, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tunelens.core.stages import StageMap

__all__ = ["StageInputs", "capturing", "resumable", "resume_saving", "resumed"]

CHECK_SAMPLES = 2


@dataclass
class StageInputs:
    """Per stage: its first module's inputs, one tensor per batch of the loader; the first samples of the first
    batch (inputs and logits) to check a resumed run against."""

    first: dict[str, str]
    batches: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    check_x: torch.Tensor | None = None
    check_logits: torch.Tensor | None = None
    dropped: list[str] = field(default_factory=list)  # stages given up for the memory cap


def resume_saving(smap: StageMap, stages: Sequence[str]) -> float:
    """Passes saved by resuming ``stages`` instead of re-running them from the input, counting each stage
    before as an equal share of a pass (a proxy: the stages' real costs are unknown before they run)."""
    order = smap.names
    return sum(order.index(s) / len(order) for s in stages if s in order)


@contextmanager
def capturing(model: nn.Module, smap: StageMap, stages: Sequence[str], max_bytes: int) -> Iterator[StageInputs]:
    """Record, while ``model`` runs over a loader inside the block, the input of each of ``stages``' first modules
    (per batch, detached copies on the model's device) and the logits of the first batch's first samples.
    Past ``max_bytes`` the earliest stages are dropped first (their inputs are the largest and resuming them
    saves the least)."""
    mods = dict(model.named_modules())
    want = [s for s in stages if smap.stage(s).modules and smap.stage(s).modules[0] in mods]
    out = StageInputs(first={s: smap.stage(s).modules[0] for s in want})
    out.batches = {s: [] for s in want}
    handles = []

    def pre(stage: str):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if stage in out.batches and args and isinstance(args[0], torch.Tensor):
                out.batches[stage].append(args[0].detach().clone())
                _cap(out, max_bytes)

        return hook

    def root_pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
        if out.check_x is None and args and isinstance(args[0], torch.Tensor):
            out.check_x = args[0][:CHECK_SAMPLES].detach().clone()

    def root_post(_m: nn.Module, _args: Any, output: Any) -> None:
        if out.check_logits is None and isinstance(output, torch.Tensor):
            out.check_logits = output[:CHECK_SAMPLES].detach().float().clone()

    try:
        for s in want:
            handles.append(mods[out.first[s]].register_forward_pre_hook(pre(s)))
        handles.append(model.register_forward_pre_hook(root_pre))
        handles.append(model.register_forward_hook(root_post))
        yield out
    finally:
        for h in handles:
            h.remove()


def _cap(out: StageInputs, max_bytes: int) -> None:
    def size() -> int:
        return sum(t.numel() * t.element_size() for ts in out.batches.values() for t in ts)

    while out.batches and size() > max_bytes:
        first = next(iter(out.batches))
        del out.batches[first]
        out.dropped.append(first)


@contextmanager
def resumed(model: nn.Module, smap: StageMap, inputs: StageInputs, stage: str, feed: Iterable[torch.Tensor]):
    """Inside the block ``model`` skips the stages before ``stage`` (their modules are identities) and the first
    module of ``stage`` receives the tensors of ``feed``, one per forward call, in order; restored on exit."""
    order = smap.names
    prefix = [m for s in smap.stages[: order.index(stage)] for m in s.modules]
    originals = {n: model.get_submodule(n) for n in prefix}
    it = iter(feed)

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args:
            raise RuntimeError(f"stage {stage!r}: its first module took no positional input; it cannot be resumed")
        return (next(it), *args[1:])

    handle = model.get_submodule(inputs.first[stage]).register_forward_pre_hook(hook)
    try:
        for n in prefix:
            model.set_submodule(n, nn.Identity())
        yield model
    finally:
        handle.remove()
        for n, m in originals.items():
            model.set_submodule(n, m)


@torch.no_grad()
def resumable(model: nn.Module, smap: StageMap, inputs: StageInputs, stage: str) -> bool:
    """Whether ``model`` resumed at ``stage`` (weights as recorded) gives the recorded logits of the check
    samples (to float rounding: another batch size may pick other kernels)."""
    if stage not in inputs.batches or not inputs.batches[stage] or inputs.check_x is None:
        return False
    if inputs.check_logits is None:
        return False
    feed = [inputs.batches[stage][0][:CHECK_SAMPLES]]
    try:
        with resumed(model, smap, inputs, stage, feed):
            out = model(inputs.check_x)
    except Exception:
        return False
    if not isinstance(out, torch.Tensor) or out.shape != inputs.check_logits.shape:
        return False
    return bool(torch.allclose(out.float(), inputs.check_logits, rtol=1e-4, atol=1e-5))


def first_changed_stage(
    smap: StageMap, base_sd: dict[str, torch.Tensor], tuned_sd: dict[str, torch.Tensor], keys: Sequence[str]
) -> str | None:
    """The first stage whose shared entries (``keys``) differ between the two state dicts, when at least one
    stage before it is identical in both (a frozen prefix, as a linear probe or last-k fine-tuning leaves it);
    the last stage when none differs; None when the first stage already differs."""
    by_stage: dict[str, list[str]] = {}
    for k in keys:
        by_stage.setdefault(smap.stage_of(k), []).append(k)
    for i, s in enumerate(smap.names):
        if any(not torch.equal(base_sd[k].to(tuned_sd[k].device), tuned_sd[k]) for k in by_stage.get(s, [])):
            return s if i >= 1 else None
    return smap.names[-1] if len(smap.names) > 1 else None
