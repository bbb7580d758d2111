"""The straight path from the pretrained to the fine-tuned weights, and its loss barrier.

:func:`interpolate` evaluates ``theta(alpha) = (1 - alpha) theta_base + alpha theta_tuned`` over the parameters
and buffers the two models share outside the tuned head (:func:`tunelens.analysis.measures.weight_space.shared_keys`), with the
tuned head fixed, and the loss barrier ``B = max_alpha L(theta(alpha)) - [(1 - alpha) L(theta(0)) + alpha
L(theta(1))]`` (Neyshabur, Sedghi and Zhang 2020; Frankle, Dziugaite, Roy and Carbin 2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis"). ``B`` close to 0: base and tuned lie in one basin. It works on
a copy: the caller's models never change.
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

from tunelens.analysis.measures.resume import StageInputs, capturing, first_changed_stage, resume_saving, resumed
from tunelens.analysis.measures.weight_space import assign, device_of, rewound_model, shared_keys, unwrap
from tunelens.core.evaluation import evaluate, unpack_batch
from tunelens.core.runtime import all_reduce_sum, no_tf32, world_size
from tunelens.core.stages import StageMap, stages

__all__ = ["InterpolationResult", "interpolate", "interpolated_state", "loss_barrier", "recompute_bn"]


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
    resumed_from: str | None = None

    def summary(self) -> dict[str, Any]:
        """Everything but the table, as plain values (for a JSON summary)."""
        d = asdict(self)
        d.pop("table")
        return d


@torch.no_grad()
def interpolated_state(
    base: nn.Module, tuned: nn.Module, alpha: float, keys: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """``tuned``'s state dict with every shared entry set to ``(1 - alpha) theta_b + alpha theta_t``.

    Exact at the endpoints: ``alpha == 0`` gives the base tensors and ``alpha == 1`` the tuned
    ones bit for bit. Integer entries (``num_batches_tracked``) take the nearer endpoint.
    The head and unshared entries are tuned's. Tensors are new copies on tuned's devices.
    """
    base, tuned = unwrap(base), unwrap(tuned)
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
    dev = device_of(model, device)
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


def _same_when_resumed(
    model: nn.Module,
    smap: StageMap,
    inputs: StageInputs,
    start: str,
    measure: Callable[[], tuple[int, dict[str, float]]],
    row: Mapping[str, float],
) -> bool:
    """Whether re-running the point just measured from ``start``'s recorded inputs gives the same row."""
    if not inputs.batches.get(start):
        return False
    try:
        with resumed(model, smap, inputs, start, list(inputs.batches[start])):
            _, again = measure()
    except Exception:
        return False
    return again["acc"] == row["acc"] and abs(again["loss"] - row["loss"]) <= 1e-6 * max(1.0, abs(row["loss"]))


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
    stage_map: StageMap | None = None,
    resume: bool = True,
    resume_bytes: int = 2**30,
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
    ``resume``: when the tuned model left its first stages as the base had them (a linear probe, last-k), every
    alpha gives them the same weights, so what reaches the first changed stage is recorded at the first alpha
    (BatchNorm re-estimation and evaluation, at most ``resume_bytes``) and the other alphas run from there
    (:mod:`tunelens.analysis.measures.resume`), once a resumed re-run of the first alpha reproduced its row; only when that saves
    at least one pass over the data (stages counted as equal shares). ``stage_map``: the stages (default
    :func:`tunelens.core.stages.stages` of ``base``). ``resumed_from`` in the result names the stage.
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
    base, tuned = unwrap(base), unwrap(tuned)
    dev = device_of(tuned, device)
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
    # a frozen prefix (the stages before `start`) is the same at every alpha, and so are its re-estimated
    # BatchNorm statistics: record what reaches `start` once, then run only the rest at the other alphas
    smap = stage_map
    if smap is None and resume:
        try:
            smap = stages(base)
        except Exception:
            smap = None
    start = first_changed_stage(smap, base.state_dict(), state, keys) if smap is not None else None
    plan: tuple[StageMap, str] | None = None
    if resume and smap is not None and start is not None and (len(alphas) - 2) * resume_saving(smap, [start]) >= 1:
        plan = (smap, start)
    inputs: StageInputs | None = None
    resuming = False

    def measure() -> tuple[int, dict[str, float]]:
        return (recompute_bn(model, bn_inputs, dev) if bn_inputs else 0), evaluate(model, data, dev)

    with no_tf32():
        for i, a in enumerate(alphas):
            assign(state, interpolated_state(base, tuned, a, keys), state.keys())
            if plan is not None and inputs is not None and resuming:
                with resumed(model, plan[0], inputs, plan[1], inputs.batches[plan[1]]):
                    n_bn, r = measure()
            elif plan is not None and i == 0:
                with capturing(model, plan[0], [plan[1]], resume_bytes) as inputs:
                    n_bn, r = measure()
                resuming = _same_when_resumed(model, plan[0], inputs, plan[1], measure, r)
            else:
                n_bn, r = measure()
            rows.append({"alpha": a, **r})
        resumed_from = plan[1] if plan is not None and resuming else None
        if bn_inputs and endpoints is not None:
            ends = {k: dict(endpoints[k]) for k in ("base", "tuned")}
        elif bn_inputs:
            ends = {"base": evaluate(rewound_model(base, tuned).to(dev), data, dev)}
            assign(state, tuned.state_dict(), state.keys())
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
        resumed_from=resumed_from,
    )
