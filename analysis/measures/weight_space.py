"""Weight-space helpers shared by rewinding and interpolation: which state entries base and tuned share, groups
of them by module prefix or stage, and copying entries from one state into a model.

"Shared" entries are the state-dict entries (parameters *and* buffers, so BatchNorm running statistics go with
their layer) present in both models with equal shapes, outside the tuned model's head
(:func:`tunelens.core.naming.head_name`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from tunelens.analysis.measures.layers import stage_of
from tunelens.core.naming import head_name
from tunelens.core.runtime import resolve_device
from tunelens.core.stages import stages

__all__ = ["GroupSpec", "assign", "device_of", "resolve_groups", "rewound_model", "shared_keys", "under", "unwrap"]

GroupSpec = str | Sequence[str] | Mapping[str, str | Sequence[str]]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else the model itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` resolved, or where the model's first parameter or buffer lives (CPU for an empty model)."""
    if device is not None:
        return resolve_device(device)
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def under(name: str, prefix: str) -> bool:
    """Whether the dotted ``name`` is ``prefix`` or lies inside the module ``prefix``."""
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


def shared_keys(base: nn.Module, tuned: nn.Module) -> list[str]:
    """State-dict entries of ``tuned`` (in its order) that ``base`` has with the same shape, outside tuned's head."""
    base, tuned = unwrap(base), unwrap(tuned)
    head = head_name(tuned)
    sb = base.state_dict()
    return [k for k, v in tuned.state_dict().items() if not under(k, head) and k in sb and sb[k].shape == v.shape]


def resolve_groups(
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
        sel = [k for k in keys if any(under(k, p) for p in prefixes)]
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
def assign(state: Mapping[str, torch.Tensor], src: Mapping[str, torch.Tensor], keys: Iterable[str]) -> None:
    """Copy ``src[k]`` into the model tensors ``state[k]`` in place (``state`` from ``model.state_dict()``)."""
    for k in keys:
        state[k].copy_(src[k])


def rewound_model(base: nn.Module, tuned: nn.Module, group: str | Sequence[str] = "all_but_head") -> nn.Module:
    """A copy of ``tuned`` with ``group`` (module-name prefixes, a stage name, or ``"all_but_head"``) set to base."""
    base, tuned = unwrap(base), unwrap(tuned)
    model = copy.deepcopy(tuned)
    keys = shared_keys(base, model)
    sel = (
        keys
        if group == "all_but_head"
        else resolve_groups(keys, {str(group): group}, head_name(model), stages(base).stage_of)[0][1]
    )
    sb = base.state_dict()
    assign(model.state_dict(), sb, sel)
    return model
