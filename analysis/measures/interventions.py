"""Weight-space interventions: rewinding parts of a fine-tuned model, and the straight path from base to tuned.

Both tests edit *weights* and measure the target task with :func:`tunelens.core.evaluation.evaluate`
(correct counts and summed losses, all-reduced across ranks, so the numbers are right
under ``torch.distributed``). They work on copies: the caller's models never change.

* :func:`rewind` -- re-initialisation robustness in its cheap form: set one group of
  parameters of the tuned model back to the base (pretrained) weights and re-evaluate
  (Zhang, Bengio and Singer 2019, "Are All Layers Created Equal?"; Neyshabur, Sedghi and
  Zhang 2020, "What is being transferred in transfer learning?", module criticality).
  A stage whose rewinding costs little accuracy did not need its fine-tuning changes.
* :func:`~tunelens.analysis.measures.interpolation.interpolate` (its own module) -- the linear path
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
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from tunelens.analysis.measures.resume import capturing, resumable, resume_saving, resumed
from tunelens.analysis.measures.weight_space import (
    GroupSpec,
    assign,
    device_of,
    resolve_groups,
    shared_keys,
    under,
    unwrap,
)
from tunelens.core.evaluation import evaluate
from tunelens.core.naming import head_name
from tunelens.core.runtime import no_tf32
from tunelens.core.stages import StageMap, stages

__all__ = ["RewindResult", "rewind"]


@dataclass(frozen=True)
class RewindResult:
    """:func:`rewind`'s answer: the ``table`` (one row per group), the state entries outside the head that
    could not be rewound because their shapes differ (``skipped``), the device it ran on, and the stages that
    were re-run from their recorded inputs (``resumed``, :mod:`tunelens.analysis.measures.resume`)."""

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
    :meth:`tunelens.analysis.engine.passes.ModelPass.metrics`), so the unchanged model is not evaluated again.
    ``resume``: a stage after the first is re-run from its own input, recorded in the tuned model's pass
    (:mod:`tunelens.analysis.measures.resume`; at most ``resume_bytes`` of inputs, each stage checked first), when that saves at
    least one pass over ``data`` net of the recording pass; ``reference`` is then measured by that pass.
    """
    base, tuned = unwrap(base), unwrap(tuned)
    dev = device_of(tuned, device)
    model = copy.deepcopy(tuned).to(dev)
    head = head_name(model)
    keys = shared_keys(base, model)
    smap = stage_map or stages(base)
    resolved = resolve_groups(keys, groups, head, smap.stage_of) + [("all_but_head", keys)]
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
                assign(state, base_sd, sel)  # only this stage and what follows it run, from its recorded input
                try:
                    with resumed(model, smap, inputs, name, inputs.batches[name]):
                        r = evaluate(model, data, dev)
                finally:
                    assign(state, tuned_sd, sel)
                resumed_stages.append(name)
            else:
                assign(state, base_sd, sel)
                try:
                    r = evaluate(model, data, dev)
                finally:
                    assign(state, tuned_sd, sel)
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
    skipped = tuple(k for k in tuned.state_dict() if not under(k, head) and k not in shared)
    return RewindResult(df.reset_index(drop=True), skipped, str(dev), tuple(resumed_stages))
