"""Weight-space interventions: rewinding parts of a fine-tuned model, and the straight path from base to tuned.

Both tests edit *weights* and measure the target task with :func:`tunelens.core.evaluation.evaluate`
(correct counts and summed losses, all-reduced across ranks, so the numbers are right
under ``torch.distributed``). They work on copies: the caller's models never change.

* :func:`rewind` -- re-initialisation robustness in its cheap form: set one group of
  parameters of the tuned model back to the base (pretrained) weights and re-evaluate
  (Zhang, Bengio and Singer 2019, "Are All Layers Created Equal?"; Neyshabur, Sedghi and
  Zhang 2020, "What is being transferred in transfer learning?", module criticality).
  A stage whose rewinding costs little accuracy did not need its fine-tuning changes.
* :func:`interpolate` -- the linear path
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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tunelens.core.evaluation import evaluate, unpack_batch
from tunelens.core.naming import head_name
from tunelens.core.runtime import all_reduce_sum, no_tf32, resolve_device, world_size
from tunelens.core.stages import StageMap, stages

from .layers import stage_of

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
    could not be rewound because their shapes differ (``skipped``), and the device it ran on."""

    table: pd.DataFrame
    skipped: tuple[str, ...] = ()
    device: str = "cpu"

    def __getitem__(self, key: Any) -> Any:
        """Deprecated: ``rewind(...)[cols]`` as README 0.1 showed; use ``rewind(...).table[cols]``."""
        warnings.warn(
            "indexing rewind()'s result is deprecated: use rewind(...).table", DeprecationWarning, stacklevel=2
        )
        return self.table[key]


@dataclass(frozen=True)
class InterpolationResult:
    """:func:`interpolate`'s answer: the ``table`` (one row per alpha) and what was measured along the path.

    ``barrier``: max excess loss (:func:`loss_barrier`); ``barrier_alpha``: where it is reached (an endpoint
    when it is 0); ``bn``, ``bn_batches``, ``bn_samples``, ``bn_source``: how BatchNorm statistics were
    handled; ``n_shared``: state entries interpolated; ``endpoints``: ``{"base": {acc, loss}, "tuned": ...}``
    with the models' own statistics."""

    table: pd.DataFrame
    barrier: float
    barrier_alpha: float
    bn: str
    bn_batches: int
    bn_samples: int
    bn_source: str | None
    n_shared: int
    endpoints: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the table, as plain values (for a JSON summary)."""
        d = asdict(self)
        d.pop("table")
        return d


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
    with no_tf32():
        ref = dict(reference) if reference is not None else evaluate(model, data, dev)
        rows.append({"group": "none", "n_tensors": 0, "n_params": 0, "rel_change": 0.0, **ref})
        for name, sel in resolved:
            num = den = 0.0
            for k in sel:
                if k in params:
                    num += float((tuned_sd[k].double() - base_sd[k].double()).pow(2).sum())
                    den += float(base_sd[k].double().pow(2).sum())
            if all(torch.equal(base_sd[k], tuned_sd[k]) for k in sel):
                r = dict(ref)  # nothing to rewind (a frozen stage): the model is the tuned one, bit for bit
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
    return RewindResult(df.reset_index(drop=True), skipped, str(dev))


@torch.no_grad()
def interpolated_state(
    base: nn.Module, tuned: nn.Module, alpha: float, keys: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """``tuned``'s state dict with every shared entry set to ``(1 - alpha) theta_b + alpha theta_t``.

    Exact at the endpoints: ``alpha == 0`` gives the base tensors and ``alpha == 1`` the tuned
    ones bit for bit. Integer entries (``num_batches_tracked``) take the nearer endpoint.
    The head and unshared entries are tuned's. Tensors are new copies on tuned's devices.
    """
    base, tuned = _unwrap(base), _unwrap(tuned)
    keys = shared_keys(base, tuned) if keys is None else keys
    st = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
    sb = base.state_dict()
    a = float(alpha)
    for k in keys:
        t = st[k]
        b = sb[k].detach().to(device=t.device)
        if a == 1.0:
            continue
        if a == 0.0 or not t.is_floating_point():
            st[k] = (b if a < 0.5 else t).to(dtype=t.dtype).clone()
        else:
            st[k] = torch.lerp(b.to(t.dtype), t, a)
    return st


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn(model: nn.Module, inputs: Iterable[torch.Tensor], device: torch.device | str | None = None) -> int:
    """Re-estimate every BatchNorm's running statistics from ``inputs``, as ``torch.optim.swa_utils.update_bn``.

    Statistics are reset, ``momentum=None`` makes them the cumulative average over the
    batches (per-batch means and unbiased variances), only the BatchNorm layers are in
    train mode (dropout stays off). Under ``torch.distributed`` the per-rank estimates are
    averaged. Returns the number of samples seen; the model's modes and momenta are restored.
    """
    bns = _bn_layers(model)
    if not bns:
        return 0
    dev = _device_of(model, device)
    modes = {m: m.training for m in model.modules()}
    moms = {}
    for m in bns:
        m.reset_running_stats()
        moms[m], m.momentum = m.momentum, None
    n = 0
    try:
        model.eval()
        for m in bns:
            m.train()
        for x in inputs:
            model(x.to(dev, non_blocking=True))
            n += len(x)
    finally:
        for m in bns:
            m.momentum = moms[m]
        for mod, mode in modes.items():
            mod.training = mode
    ws = world_size()
    if ws > 1:
        for m in bns:
            if m.running_mean is not None and m.running_var is not None:
                all_reduce_sum(m.running_mean).div_(ws)
                all_reduce_sum(m.running_var).div_(ws)
    return n


def loss_barrier(df: pd.DataFrame) -> float:
    """``B = max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))]`` from an :func:`interpolate` table (>= 0)."""
    a = df["alpha"].to_numpy(dtype=float)
    loss = df["loss"].to_numpy(dtype=float)
    i0, i1 = np.flatnonzero(a == 0.0), np.flatnonzero(a == 1.0)
    if not len(i0) or not len(i1):
        raise ValueError("the loss barrier needs rows at alpha = 0 and alpha = 1")
    lin = (1 - a) * loss[i0[0]] + a * loss[i1[0]]
    return float(np.max(loss - lin))


def interpolate(
    base: nn.Module,
    tuned: nn.Module,
    data: Iterable,
    *,
    steps: int = 11,
    alphas: Sequence[float] | None = None,
    bn: str = "recompute",
    train_loader: Iterable | None = None,
    bn_batches: int = 4,
    device: torch.device | str | None = None,
    endpoints: Mapping[str, Mapping[str, float]] | None = None,
) -> InterpolationResult:
    """Target loss and accuracy along ``theta(alpha) = (1 - alpha) theta_base + alpha theta_tuned``.

    ``alpha`` runs over ``steps`` evenly spaced values in [0, 1] (or ``alphas``; 0 and 1 are
    always added). The head stays the tuned one. BatchNorm statistics (``bn``):

    * ``"recompute"`` (default): at every alpha, reset and re-estimate them on the *same*
      first ``bn_batches`` batches of ``train_loader`` (collected once), see
      :func:`recompute_bn`; interpolated running statistics of a network with interpolated
      weights describe neither. Without ``train_loader`` the evaluation ``data`` is used
      (with a warning). The endpoints are re-estimated too, so they differ slightly from the
      models as saved; those values are in ``endpoints``.
    * ``"interpolate"``: running statistics are interpolated like the weights; alpha 0 and 1
      reproduce the base backbone (with the tuned head) and the tuned model exactly.

    Columns: ``alpha``, ``acc``, ``loss``, ``linear_loss = (1-alpha) L(0) + alpha L(1)``,
    ``excess_loss = loss - linear_loss``, ``n``, ``bn`` (:attr:`InterpolationResult.table`); the result also
    holds ``barrier`` (max excess
    loss, :func:`loss_barrier`), ``barrier_alpha`` (where it is reached; an endpoint when
    ``B = 0``), ``bn``, ``bn_batches``, ``bn_samples``,
    ``bn_source``, ``endpoints`` (``{"base": {acc, loss}, "tuned": {...}}`` with the models'
    own statistics), ``n_shared``. A model without BatchNorm has nothing to re-estimate
    (``bn_batches == 0``).
    ``endpoints``: ``{"base": {acc, loss}, "tuned": {...}}`` when already measured on ``data`` (the base backbone
    under the tuned head is :func:`rewind`'s ``all_but_head`` row, the tuned model its ``none`` row), so the two
    models are not evaluated again.
    """
    if bn not in ("recompute", "interpolate"):
        raise ValueError(f"bn must be 'recompute' or 'interpolate', got {bn!r}")
    if alphas is None:
        if steps < 2:
            raise ValueError(f"steps must be at least 2, got {steps}")
        alphas = [i / (steps - 1) for i in range(steps)]
    alphas = sorted({float(a) for a in alphas} | {0.0, 1.0})
    if alphas[0] < 0 or alphas[-1] > 1:
        raise ValueError("alphas must lie in [0, 1]")
    base, tuned = _unwrap(base), _unwrap(tuned)
    dev = _device_of(tuned, device)
    model = copy.deepcopy(tuned).to(dev)
    keys = shared_keys(base, model)
    state = model.state_dict()
    bn_inputs: list[torch.Tensor] = []
    source = None
    if bn == "recompute" and _bn_layers(model):
        source = "train_loader"
        if train_loader is None:
            warnings.warn(
                "interpolate(bn='recompute') without train_loader: BatchNorm statistics are "
                "re-estimated on the evaluation loader",
                stacklevel=2,
            )
            train_loader, source = data, "data"
        bn_inputs = [unpack_batch(b)[0] for b in itertools.islice(train_loader, bn_batches)]
        if not bn_inputs:
            raise ValueError("the loader for BatchNorm re-estimation yielded no batch")
    rows, n_bn = [], 0
    with no_tf32():
        for a in alphas:
            _assign(state, interpolated_state(base, tuned, a, keys), state.keys())
            if bn_inputs:
                n_bn = recompute_bn(model, bn_inputs, dev)
            rows.append({"alpha": a, **evaluate(model, data, dev)})
        if bn_inputs and endpoints is not None:
            ends = {k: dict(endpoints[k]) for k in ("base", "tuned")}
        elif bn_inputs:
            ends = {"base": evaluate(rewound_model(base, tuned).to(dev), data, dev)}
            _assign(state, tuned.state_dict(), state.keys())
            ends["tuned"] = evaluate(model, data, dev)
        else:
            ends = {"base": rows[0], "tuned": rows[-1]}
    df = pd.DataFrame(rows)
    l0, l1 = df["loss"].iloc[0], df["loss"].iloc[-1]
    df["linear_loss"] = (1 - df["alpha"]) * l0 + df["alpha"] * l1
    df["excess_loss"] = df["loss"] - df["linear_loss"]
    df["bn"] = bn if _bn_layers(model) else "none"  # "none": no BatchNorm layer (a transformer)
    df = df[["alpha", "acc", "loss", "linear_loss", "excess_loss", "n", "bn"]]
    return InterpolationResult(
        table=df,
        barrier=loss_barrier(df),
        barrier_alpha=float(df["alpha"].iloc[int(df["excess_loss"].argmax())]),
        bn=bn,
        bn_batches=len(bn_inputs),
        bn_samples=int(n_bn),
        bn_source=source,
        n_shared=len(keys),
        endpoints={k: {"acc": float(v["acc"]), "loss": float(v["loss"])} for k, v in ends.items()},
    )
