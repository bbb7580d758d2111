"""Weight-space interventions: rewinding parts of a fine-tuned model, and the straight path from base to tuned.

Both tests edit *weights* and measure the target task with :func:`tunelens.core.evaluation.evaluate`
(correct counts and summed losses, all-reduced across ranks, so the numbers are right
under ``torch.distributed``). They work on copies: the caller's models never change.

* :func:`rewind` -- re-initialisation robustness in its cheap form: set one group of
  parameters of the tuned model back to the base (pretrained) weights and re-evaluate
  (Zhang, Bengio and Singer 2019, "Are All Layers Created Equal?"; Neyshabur, Sedghi and
  Zhang 2020, "What is being transferred in transfer learning?", module criticality).
  A stage whose rewinding costs little accuracy did not need its fine-tuning changes.
* :func:`interpolate` (:mod:`analysis.interpolation`, importable from here too) -- the linear path
  ``theta(alpha) = (1 - alpha) theta_base + alpha theta_tuned`` over the shared
  parameters with the tuned head fixed, and the loss barrier
  ``B = max_alpha L(theta(alpha)) - [(1 - alpha) L(theta(0)) + alpha L(theta(1))]``
  (Neyshabur et al. 2020; Frankle, Dziugaite, Roy and Carbin 2020, "Linear Mode
  Connectivity and the Lottery Ticket Hypothesis"). ``B`` close to 0: base and tuned lie
  in one basin.

"Shared" entries are the state-dict entries (parameters *and* buffers, so BatchNorm
running statistics go with their layer) present in both models with equal shapes,
outside the tuned model's head (:func:`tunelens.core.naming.head_name`). The replaced head is
never rewound or interpolated: ``theta_base`` means the base backbone with the *tuned*
head.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from tunelens.analysis.measures.layers import stage_of
from tunelens.analysis.measures.resume import capturing, resumable, resume_saving, resumed
from tunelens.core.evaluation import evaluate
from tunelens.core.naming import head_name
from tunelens.core.runtime import no_tf32, resolve_device
from tunelens.core.stages import StageMap, stages

__all__ = [
    "InterpolationResult",
    "RewindResult",
    "interpolate",
    "interpolated_state",
    "loss_barrier",
    "recompute_bn",
    "rewind",
    "rewound_model",
    "shared_keys",
]

GroupSpec = str | Sequence[str] | Mapping[str, str | Sequence[str]]


@dataclass(frozen=True)
class RewindResult:
    """:func:`rewind`'s answer: the ``table`` (one row per group), the state entries outside the head that
    could not be rewound because their shapes differ (``skipped``), the device it ran on, and the stages that
    were re-run from their recorded inputs (``resumed``, :mod:`analysis.resume`)."""

    table: pd.DataFrame
    skipped: tuple[str, ...] = ()
    device: str = "cpu"
    resumed: tuple[str, ...] = ()

    def __getitem__(self, key: Any) -> Any:
        """Deprecated: ``rewind(...)[cols]`` as README 0.1 showed; use ``rewind(...).table[cols]``."""
        warnings.warn(
            "indexing rewind()'s result is deprecated: use rewind(...).table", DeprecationWarning, stacklevel=2
        )
        return self.table[key]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return resolve_device(device)
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _under(name: str, prefix: str) -> bool:
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


def shared_keys(base: nn.Module, tuned: nn.Module) -> list[str]:
    """State-dict entries of ``tuned`` (in its order) that ``base`` has with the same shape, outside tuned's head."""
    base, tuned = _unwrap(base), _unwrap(tuned)
    head = head_name(tuned)
    sb = base.state_dict()
    return [k for k, v in tuned.state_dict().items() if not _under(k, head) and k in sb and sb[k].shape == v.shape]


def _resolve_groups(
    keys: list[str], groups: GroupSpec, head: str, stage_of: Callable[[str], str] = stage_of
) -> list[tuple[str, list[str]]]:
    """``[(group name, shared keys)]``. ``"stages"``: one group per stage (``stage_of``), in forward order."""
    if isinstance(groups, str) and groups == "stages":
        by: dict[str, list[str]] = {}
        for k in keys:
            by.setdefault(stage_of(k), []).append(k)
        return list(by.items())
    if isinstance(groups, str):
        groups = [groups]
    items = list(groups.items()) if isinstance(groups, Mapping) else [(g, g) for g in groups]
    out = []
    for name, prefixes in items:
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        sel = [k for k in keys if any(_under(k, p) for p in prefixes)]
        if not sel:  # a stage name such as "stem"
            sel = [k for k in keys if stage_of(k) in prefixes]
        if not sel:
            stages = sorted({stage_of(k) for k in keys})
            raise ValueError(
                f"rewind group {name!r} ({', '.join(prefixes)}) matches no parameter that base and tuned "
                f"share (the head {head!r} is never rewound). Use module names of the model or a stage: "
                f"{', '.join(stages)}."
            )
        out.append((str(name), sel))
    return out


@torch.no_grad()
def _assign(state: Mapping[str, torch.Tensor], src: Mapping[str, torch.Tensor], keys: Iterable[str]) -> None:
    """Copy ``src[k]`` into the model tensors ``state[k]`` in place (``state`` from ``model.state_dict()``)."""
    for k in keys:
        state[k].copy_(src[k])


def rewound_model(base: nn.Module, tuned: nn.Module, group: str | Sequence[str] = "all_but_head") -> nn.Module:
    """A copy of ``tuned`` with ``group`` (module-name prefixes, a stage name, or ``"all_but_head"``) set to base."""
    base, tuned = _unwrap(base), _unwrap(tuned)
    model = copy.deepcopy(tuned)
    keys = shared_keys(base, model)
    sel = (
        keys
        if group == "all_but_head"
        else _resolve_groups(keys, {str(group): group}, head_name(model), stages(base).stage_of)[0][1]
    )
    sb = base.state_dict()
    _assign(model.state_dict(), sb, sel)
    return model


def rewind(
    base: nn.Module,
    tuned: nn.Module,
    data: Iterable,
    *,
    groups: GroupSpec = "stages",
    device: torch.device | str | None = None,
    stage_map: StageMap | None = None,
    reference: Mapping[str, float] | None = None,
    resume: bool = True,
    resume_bytes: int = 2**30,
) -> RewindResult:
    """Target accuracy and loss of ``tuned`` with each parameter group set back to ``base``.

    ``groups``: ``"stages"`` (the stages of ``stage_map``, by default :func:`tunelens.core.stages.stages`
    of ``base``: the stem ``conv1``+``bn1``, ``layer1`` .. ``layer4`` for ResNets), a list of module-name prefixes or stage names (one
    group each), or ``{name: prefix or [prefixes]}``. Rows: ``none`` (tuned as is), one per
    group, and ``all_but_head`` (the base backbone under the tuned head). BatchNorm running
    statistics rewind with their layer; the head and entries whose shapes differ never do.

    Columns: ``group``, ``n_tensors`` (state entries rewound, buffers included), ``n_params``
    (parameter scalars rewound), ``rel_change`` (``||theta_t - theta_b|| / ||theta_b||`` over
    the group's parameters), ``acc``, ``loss``, ``acc_drop = acc(tuned) - acc(rewound)`` and
    ``loss_increase = loss(rewound) - loss(tuned)`` (accuracies are fractions in [0, 1], so
    drops are fractions too), ``n`` (target samples evaluated), in :attr:`RewindResult.table`.
    ``reference``: ``tuned``'s own ``{"acc", "loss", "n"}`` on ``data`` when already measured (e.g.
    :meth:`analysis.passes.ModelPass.metrics`), so the unchanged model is not evaluated again.
    ``resume``: a stage after the first is re-run from its own input, recorded in the tuned model's pass
    (:mod:`analysis.resume`; at most ``resume_bytes`` of inputs, each stage checked first), when that saves at
    least one pass over ``data`` net of the recording pass; ``reference`` is then measured by that pass.
    """
    base, tuned = _unwrap(base), _unwrap(tuned)
    dev = _device_of(tuned, device)
    model = copy.deepcopy(tuned).to(dev)
    head = head_name(model)
    keys = shared_keys(base, model)
    smap = stage_map or stages(base)
    resolved = _resolve_groups(keys, groups, head, smap.stage_of) + [("all_but_head", keys)]
    state = model.state_dict()
    sb = base.state_dict()
    base_sd = {k: sb[k].detach().to(dev) for k in keys}
    tuned_sd = {k: state[k].detach().clone() for k in keys}
    params = {n for n, _ in model.named_parameters()}
    rows = []
    changed = [n for n, sel in resolved if not all(torch.equal(base_sd[k], tuned_sd[k]) for k in sel)]
    later = [n for n in changed if n in smap.names[1:]]  # stages that can start from a recorded input
    saving = resume_saving(smap, later) - (1.0 if reference is not None else 0.0)
    inputs = None
    resumed_stages: list[str] = []
    with no_tf32():
        if resume and later and saving >= 1.0:
            with capturing(model, smap, later, resume_bytes) as inputs:
                ref = evaluate(model, data, dev)
        else:
            ref = dict(reference) if reference is not None else evaluate(model, data, dev)
        rows.append({"group": "none", "n_tensors": 0, "n_params": 0, "rel_change": 0.0, **ref})
        for name, sel in resolved:
            num = den = 0.0
            for k in sel:
                if k in params:
                    num += float((tuned_sd[k].double() - base_sd[k].double()).pow(2).sum())
                    den += float(base_sd[k].double().pow(2).sum())
            if name not in changed:
                r = dict(ref)  # nothing to rewind (a frozen stage): the model is the tuned one, bit for bit
            elif inputs is not None and resumable(model, smap, inputs, name):
                _assign(state, base_sd, sel)  # only this stage and what follows it run, from its recorded input
                try:
                    with resumed(model, smap, inputs, name, inputs.batches[name]):
                        r = evaluate(model, data, dev)
                finally:
                    _assign(state, tuned_sd, sel)
                resumed_stages.append(name)
            else:
                _assign(state, base_sd, sel)
                try:
                    r = evaluate(model, data, dev)
                finally:
                    _assign(state, tuned_sd, sel)
            rows.append(
                {
                    "group": name,
                    "n_tensors": len(sel),
                    "n_params": int(sum(base_sd[k].numel() for k in sel if k in params)),
                    "rel_change": (num**0.5) / (den**0.5) if den > 0 else float("nan"),
                    **r,
                }
            )
    df = pd.DataFrame(rows)
    df["acc_drop"] = ref["acc"] - df["acc"]
    df["loss_increase"] = df["loss"] - ref["loss"]
    df = df[["group", "n_tensors", "n_params", "rel_change", "acc", "loss", "acc_drop", "loss_increase", "n"]]
    shared = set(keys)
    skipped = tuple(k for k in tuned.state_dict() if not _under(k, head) and k not in shared)
    return RewindResult(df.reset_index(drop=True), skipped, str(dev), tuple(resumed_stages))


# the interpolation lives in its own module; its names stay importable from here (the public API of 0.1)
from tunelens.analysis.measures.interpolation import (  # noqa: E402
    InterpolationResult,
    interpolate,
    interpolated_state,
    loss_barrier,
    recompute_bn,
)
