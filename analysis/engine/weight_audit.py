"""The streaming weight audit: two checkpoints compared tensor by tensor, never more than a few tensors in memory,
split over ``torch.distributed`` ranks by size.

:func:`plan_audit` opens both checkpoints (headers only), pairs their tensors (:mod:`..io.tensor_pairing`) and
checks every pair's shape and dtype before any tensor is read; :func:`run_audit` measures each pair
(:mod:`..measures.tensor_measures`) and returns one row per tensor, in the same order however many processes
ran it. A PEFT adapter as the tuned side gives ``W1 = W0 + scale * B @ A`` per adapted module, one module at a
time; base tensors the adapter does not touch are identical.

Per tensor, memory holds ``W0`` as stored and ``dW`` in float32 (the tuned tensor is read in chunks straight into
``dW``, which becomes ``W1`` in place for the intruder measure), plus chunked temporaries (8 MiB) and thin
``rows x (k + 8)`` sketches: about 6 bytes per entry of the largest tensor for bfloat16 checkpoints.

**Intruder dimensions** (Shuttleworth et al. 2024; definition in :mod:`tunelens.analysis.intruders`): for
matrices of at most ``exact_max_numel`` entries, :func:`tunelens.analysis.measures.intruders.intruder_row` itself (all of the
base's singular vectors, float64); above that (``intruder_method`` ``top-K``) the tuned matrix's top-``k`` left
singular vectors are compared with the base's top ``intruder_base_k``, both from
:func:`..measures.tensor_measures.randomized_svd`. Fewer base
directions can only lower a max-cosine, so the large-matrix counts are upper bounds of the exact ones.

**Ranks**: tensors are dealt greedily by bytes (largest first, each to the least loaded rank), every rank measures
its share, and the rows are gathered in single-process order. A row depends only on its tensor and the
options (the randomized spectra are seeded by the tensor's name), so the gathered table equals one process's
bit for bit at equal torch thread counts (BLAS reductions may round differently with other thread counts).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from tunelens.core.naming import stage_of
from tunelens.core.runtime import all_gather_objects, rank, world_size

from ..io.lora_adapter import LoraAdapter, is_adapter_folder, open_adapter
from ..io.tensor_pairing import Pairing, canonical_name, pair_names
from ..io.tensor_stream import CheckpointInputError, TensorSource, open_checkpoint
from ..measures.intruders import intruder_row as exact_intruder_row
from ..measures.intruders import topk_intruders
from ..measures.tensor_measures import (
    bit_identical,
    entry_stats,
    spectral_stats,
    update_spectrum,
)
from .module_kinds import module_kind

__all__ = ["COLUMNS", "AuditOptions", "AuditPlan", "assign_ranks", "plan_audit", "run_audit"]

COLUMNS = [
    "name",
    "tuned_name",
    "module",
    "stage",
    "depth",
    "module_kind",
    "kind",
    "dtype",
    "shape",
    "numel",
    "status",
    "identical",
    "norm_base",
    "norm_tuned",
    "frobenius",
    "relative",
    "cosine",
    "max_abs",
    "changed_share",
    "spectral",
    "stable_rank",
    "effective_rank",
    "numerical_rank",
    "top1_energy",
    "spectrum_energy",
    "rank_method",
    "intruder_k",
    "intruders",
    "min_max_cos",
    "mean_max_cos",
    "intruder_method",
]
_LAYER = re.compile(r"^(?P<layer>(?:.*\.)?(?:layers|layer|h|blocks|block)\.(?P<i>\d+))\.")


@dataclass(frozen=True)
class AuditOptions:
    """``exact_max_numel``: matrices up to this many entries get exact spectra and intruders; ``rank_k``: singular
    values computed above it; ``niter``: subspace iterations; ``intruder_k``/``intruder_threshold``: as in
    :func:`tunelens.analysis.intruders.intruder_dimensions`; ``intruder_base_k``: base directions compared above
    the exact size; ``device``: where the arithmetic runs."""

    exact_max_numel: int = 1 << 20
    rank_k: int = 32
    niter: int = 2
    intruders: bool = True
    intruder_k: int = 10
    intruder_threshold: float = 0.5
    intruder_base_k: int = 32
    device: str = "cpu"


@dataclass
class AuditPlan:
    """What to compare: ``items`` are ``(base name, tuned name or None)`` in table order; ``tuned_name`` None
    means the adapter's update (or nothing, when the adapter does not touch the tensor)."""

    base: TensorSource
    tuned: TensorSource | None
    adapter: LoraAdapter | None
    pairing: Pairing
    items: list[tuple[str, str | None]] = field(default_factory=list)
    stages: dict[str, tuple[str, int]] = field(default_factory=dict)  # base name -> (stage, depth)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _stages(names: list[str]) -> dict[str, tuple[str, int]]:
    """Stage (a numbered layer such as ``layers.3``, else :func:`tunelens.core.naming.stage_of`) and depth of
    each tensor: embeddings and other stages before the first layer, layers by number, the rest after."""
    found: dict[str, tuple[str, int | None]] = {}
    for n in names:
        c = canonical_name(n)
        m = _LAYER.match(c)
        found[n] = (m["layer"], int(m["i"])) if m else (stage_of(c), None)
    top = max((i for _, i in found.values() if i is not None), default=-1)
    out: dict[str, tuple[str, int]] = {}
    for n, (stage, i) in found.items():
        if i is not None:
            out[n] = (stage, i + 1)
        else:
            out[n] = (stage, 0 if "embed" in stage or stage in ("stem", "wte", "wpe") else top + 2)
    return out


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or a.samefile(b)
    except OSError:
        return False


def plan_audit(base: str | Path, tuned: str | Path) -> AuditPlan:
    """Open and pair two checkpoints and check them (headers only); :class:`CheckpointInputError` on bad input."""
    bp, tp = Path(base), Path(tuned)
    if bp.exists() and tp.exists() and _same_path(bp, tp):
        raise CheckpointInputError(
            f"--base and --tuned are the same checkpoint ({bp}); give the fine-tuned model as --tuned"
        )
    src = open_checkpoint(bp, "--base")
    adapter = open_adapter(tp) if is_adapter_folder(tp) else None
    tsrc = None if adapter is not None else open_checkpoint(tp, "--tuned")
    if adapter is not None:
        pairing = pair_names(src.names(), adapter.targets())
        if pairing.extra:
            raise CheckpointInputError(
                f"--tuned {tp}: the adapter changes {len(pairing.extra)} tensor(s) the base does not have (e.g. "
                f"{pairing.extra[0]}): it was trained on another model; give its base model as --base"
            )
        targets = {a: b for a, b in pairing.pairs}
        items: list[tuple[str, str | None]] = [(n, None) for n in src.names()]
        for a, b in targets.items():
            info = src.infos[a]
            if b in adapter.modules:
                lm = adapter.modules[b]
                ia, ib = adapter.tensors.infos[lm.a], adapter.tensors.infos[lm.b]
                n_update = ib.shape[0] * ia.numel // ia.shape[0]
                if n_update != info.numel:
                    raise CheckpointInputError(
                        f"--tuned {tp}: the LoRA update of {lm.module} has {n_update} entries but {a} has shape "
                        f"{info.shape}: the adapter was trained on another model; give its base model as --base"
                    )
            elif adapter.tensors.infos[adapter.replacements[b]].shape != info.shape:
                raise CheckpointInputError(
                    f"--tuned {tp}: the adapter saves {b} with shape {adapter.tensors.infos[adapter.replacements[b]].shape}"
                    f" but the base's is {info.shape}; give the adapter's own base model as --base"
                )
        pairing = Pairing(pairs=pairing.pairs)  # untouched base tensors are not missing: they did not change
        items = [(n, targets.get(n)) for n, _ in items]
    else:
        assert tsrc is not None
        pairing = pair_names(src.names(), tsrc.names())
        if not pairing.pairs:
            raise CheckpointInputError(
                f"--base {bp} and --tuned {tp} have no tensor names in common (e.g. {src.names()[0]} and "
                f"{tsrc.names()[0]}); give two checkpoints of one model"
            )
        for a, b in pairing.pairs:
            ia, ib = src.infos[a], tsrc.infos[b]
            if ia.shape != ib.shape:
                raise CheckpointInputError(
                    f"tensor {a} has shape {list(ia.shape)} in --base but {list(ib.shape)} in --tuned: the checkpoints "
                    "are not of one architecture (or a layer was resized); give two checkpoints of one model"
                )
            if ia.dtype != ib.dtype:
                raise CheckpointInputError(
                    f"tensor {a} is {str(ia.dtype).removeprefix('torch.')} in --base but "
                    f"{str(ib.dtype).removeprefix('torch.')} in --tuned; save both checkpoints in one dtype"
                )
        items = list(pairing.pairs)
    stages = _stages([a for a, _ in items])
    items.sort(key=lambda it: (stages[it[0]][1], _natural(canonical_name(it[0]))))
    return AuditPlan(src, tsrc, adapter, pairing, items, stages)


def assign_ranks(sizes: list[int], world: int) -> list[int]:
    """The rank of each item: largest first (ties in item order), each to the rank with the fewest bytes so far
    (ties: the lowest rank). Greedy list scheduling: no rank exceeds the ideal share by more than the largest item."""
    load = [0] * world
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += sizes[i]
    return out


def _seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _intruders(name: str, w0: torch.Tensor, w1: torch.Tensor, opts: AuditOptions) -> dict:
    m0, m1 = w0.reshape(w0.shape[0], -1), w1.reshape(w1.shape[0], -1)
    if m0.numel() <= opts.exact_max_numel:
        r = exact_intruder_row(name, m0, m1, opts.intruder_k, opts.intruder_threshold, m0.device)
        return {
            "intruder_k": r["k"],
            "intruders": r["intruders"],
            "min_max_cos": r["min_max_cos"],
            "mean_max_cos": r["mean_max_cos"],
            "intruder_method": "exact",
        }
    r = topk_intruders(
        m0,
        m1,
        opts.intruder_k,
        opts.intruder_threshold,
        base_k=opts.intruder_base_k,
        seed=_seed(name),
        niter=opts.niter,
    )
    return {
        "intruder_k": r["k"],
        "intruders": r["intruders"],
        "min_max_cos": r["min_max_cos"],
        "mean_max_cos": r["mean_max_cos"],
        "intruder_method": r["method"],
    }


def _add_in_place(d: torch.Tensor, w0: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """``d += w0`` chunk by chunk (a mixed-dtype in-place add would convert all of ``w0`` first)."""
    fd, f0 = d.reshape(-1), w0.reshape(-1)
    for i in range(0, fd.numel(), chunk):
        fd[i : i + chunk].add_(f0[i : i + chunk])
    return d


def _read_pair(plan: AuditPlan, base: str, tuned: str | None, dev: torch.device):
    """``(W0 as stored, dW float32, stored dtype, bit-identical)`` for one item, on ``dev``. The tuned tensor is
    read in chunks straight into ``dW``: it is never held whole in its stored dtype."""
    w0 = plan.base.read(base).to(dev)
    stored = w0.dtype
    src, name = None, tuned
    if plan.adapter is None:
        src = plan.tuned
    elif tuned is not None and tuned in plan.adapter.replacements and tuned not in plan.adapter.modules:
        src, name = plan.adapter.tensors, plan.adapter.replacements[tuned]
    if src is not None and name is not None:
        flat0 = w0.reshape(-1)
        d = torch.empty(flat0.numel(), dtype=torch.float32, device=dev)
        same = True
        for off, chunk in src.chunks(name):
            c = chunk.to(dev)
            part = flat0[off : off + c.numel()]
            same = same and bit_identical(c, part)
            d[off : off + c.numel()].copy_(c).sub_(part)
        return w0, d.reshape(w0.shape), stored, same
    if tuned is None or plan.adapter is None:
        return w0, torch.zeros(w0.shape, dtype=torch.float32, device=dev), stored, True
    d = plan.adapter.delta(tuned, tuple(w0.shape), dev)
    return w0, d, stored, bool((d == 0).all())


def measure_item(plan: AuditPlan, base: str, tuned: str | None, opts: AuditOptions) -> dict:
    """One row of the table (columns :data:`COLUMNS`)."""
    dev = torch.device(opts.device)
    info = plan.base.infos[base]
    stage, depth = plan.stages[base]
    leaf = base.rsplit(".", 1)[-1]
    row: dict = dict.fromkeys(COLUMNS)
    row.update(
        name=base,
        tuned_name=tuned if tuned is not None else ("" if plan.adapter is not None else base),
        module=base.rsplit(".", 1)[0] if "." in base else "",
        stage=stage,
        depth=depth,
        module_kind=module_kind(canonical_name(base)),
        kind="weight" if len(info.shape) >= 2 else ("bias" if leaf == "bias" else "vector"),
        dtype=str(info.dtype).removeprefix("torch."),
        shape="x".join(map(str, info.shape)),
        numel=info.numel,
    )
    if not info.dtype.is_floating_point:
        raw0 = plan.base.read(base)
        raw1 = plan.tuned.read(tuned) if plan.tuned is not None and tuned is not None else raw0
        row.update(status="not floating point", identical=bit_identical(raw0, raw1))
        return row
    w0, d, stored, same = _read_pair(plan, base, tuned, dev)
    row.update(status="compared", identical=same, **entry_stats(w0, d, stored))
    if row["kind"] != "weight":
        return row
    matrix = w0.shape[0] > 1 and w0[0].numel() > 1
    if same or row["frobenius"] == 0.0:
        row.update(spectral_stats(torch.zeros(1, dtype=torch.float64), 0.0), rank_method="zero update")
        if opts.intruders and matrix:
            row.update(intruder_k=0, intruders=0, intruder_method="zero update")
        return row
    if not (math.isfinite(row["frobenius"]) and math.isfinite(row["norm_base"])):  # NaN or inf in W0 or W1
        row.update(dict.fromkeys(("spectral", "stable_rank", "effective_rank", "top1_energy"), math.nan))
        row.update(rank_method="not finite", intruder_method="not finite" if opts.intruders and matrix else None)
        return row
    s, method = update_spectrum(
        d, exact_max_numel=opts.exact_max_numel, k=opts.rank_k, seed=_seed(base), niter=opts.niter
    )
    shape2 = (d.shape[0], d[0].numel())
    row.update(spectral_stats(s, row["frobenius"] ** 2, shape2), rank_method=method)
    if opts.intruders and matrix:
        w1 = _add_in_place(d, w0)  # dW is no longer needed: W1 = W0 + dW in place
        row.update(_intruders(base, w0, w1, opts))
    return row


def run_audit(plan: AuditPlan, opts: AuditOptions, log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per paired tensor (columns :data:`COLUMNS`), in :attr:`AuditPlan.items` order; under
    ``torch.distributed`` every rank measures its share (:func:`assign_ranks`) and all get the whole table."""
    sizes = [plan.base.infos[a].nbytes for a, _ in plan.items]
    mine = [i for i, r in enumerate(assign_ranks(sizes, world_size())) if r == rank()]
    total = sum(sizes[i] for i in mine) or 1
    done, shown = 0, 0
    rows = []
    with torch.no_grad():
        for i in mine:
            a, b = plan.items[i]
            rows.append((i, measure_item(plan, a, b, opts)))
            done += sizes[i]
            if log is not None and 10 * done // total > shown:
                shown = 10 * done // total
                log(f"[weights] {100 * done // total}% of {total / 2**30:.2f} GiB")
    parts = all_gather_objects(rows)
    ordered = sorted((r for part in parts for r in part), key=lambda r: r[0])
    return pd.DataFrame([r for _, r in ordered], columns=COLUMNS)
