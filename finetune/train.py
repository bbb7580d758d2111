"""One training loop for pretraining and fine-tuning, in the spirit of torchvision's
``references/classification/train.py``: SGD or AdamW, weight decay, a cosine or step
schedule with warm-up, label smoothing, simple augmentation, early stopping on the
validation split (best weights restored), a seed, progress bars with ETA, and
resumption from the last finished epoch after an interrupt.

A linear probe (the ``linear_probe`` strategy, the probe phase of ``lp_ft``) without augmentation
trains its head on the frozen backbone's cached head inputs (``cache_features``): the backbone is
frozen in eval mode, so every epoch would compute the same features again; batches, shuffling,
optimiser and model selection are those of the uncached loop (checked in tests/test_strategies.py).

Per epoch it records, for every stage, the mean gradient norm and the mean update
ratio ``||step|| / ||theta||`` (where learning happens), into ``history``.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tunelens.core import progress as run_line
from tunelens.core import runtime
from tunelens.core.evaluation import evaluate
from tunelens.core.naming import stage_of, stage_order

from .feature_cache import cacheable, head_inputs
from .strategies import apply_freeze, set_train_mode, trainable_prefixes

__all__ = ["TrainConfig", "TrainResult", "augment_batch", "evaluate", "train"]


@dataclass
class TrainConfig:
    strategy: str = "full"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    head_lr: float | None = None  # the head's rate when the backbone trains too; None: lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | none
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    augment: bool = True
    patience: int = 0  # early stopping on val accuracy; 0 = off
    last_k: int = 1
    lp_epochs: int = 0  # lp_ft: epochs of the probe phase (then full fine-tuning)
    lp_lr: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = False  # bf16 autocast on CUDA (ignored, with a warning, elsewhere)
    sync_bn: bool = False  # SyncBatchNorm under torch.distributed on CUDA (ignored, with a warning, on CPU)
    num_workers: int = 0
    cache_features: bool = True  # linear probe without augmentation: train the head on cached features
    # NHWC memory layout for convnets: ~20% faster steps on CPU, but its convolution backward is not bit-reproducible
    # run to run there (two runs of one seed differ in the 4th digit), so it is off unless asked for
    channels_last: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0
    peak_gpu_mem_mb: float | None = None
    trainable_params: int = 0  # parameters with requires_grad while training (the largest over phases)


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and random translation by up to ``pad`` pixels (reflect padding)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (torch.arange(h)[None, :] + dy[:, None]).to(x.device)
    cols = (torch.arange(w)[None, :] + dx[:, None]).to(x.device)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def _revert_sync_batchnorm(model: nn.Module, classes: dict[str, type]) -> nn.Module:
    """Undo ``nn.SyncBatchNorm.convert_sync_batchnorm`` in place: each SyncBatchNorm becomes its original
    class (``classes``: module name -> class before conversion) sharing its parameters and buffers, so the
    state dict is unchanged and the trained model runs without a process group."""
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.SyncBatchNorm) or name not in classes:
            continue
        bn = classes[name](mod.num_features, mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        if mod.affine:
            bn.weight, bn.bias = mod.weight, mod.bias
        bn.running_mean, bn.running_var, bn.num_batches_tracked = (
            mod.running_mean,
            mod.running_var,
            mod.num_batches_tracked,
        )
        bn.train(mod.training)
        if name == "":
            return bn
        parent, _, leaf = name.rpartition(".")
        model.get_submodule(parent).add_module(leaf, bn)
    return model


def _make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float, head: str) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases and norms. ``cfg.head_lr`` gives the head its own
    learning rate when the backbone trains too (in a head-only phase the phase's rate is the head's)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def in_head(n: str) -> bool:
        return n == head or n.startswith(head + ".")

    backbone_trains = any(not in_head(n) for n, _ in params)
    groups = []
    for is_head in (False, True):
        group_lr = cfg.head_lr if (is_head and backbone_trains and cfg.head_lr) else lr
        for decay in (True, False):
            ps = [p for n, p in params if in_head(n) == is_head and (p.ndim > 1) == decay]
            if ps:
                groups.append(
                    {
                        "params": ps,
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "lr": group_lr,
                        "base_lr": group_lr,
                    }
                )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected sgd or adamw")


def _lr_factor(cfg: TrainConfig, epoch: int, step: int, steps: int, epochs: int) -> float:
    t = epoch + step / max(steps, 1)
    if cfg.warmup_epochs and t < cfg.warmup_epochs:
        return (t + 1 / max(steps, 1)) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        import math

        span = max(epochs - cfg.warmup_epochs, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min((t - cfg.warmup_epochs) / span, 1.0)))
    if cfg.schedule == "step":
        return 0.1 ** int(3 * t / max(epochs, 1))
    if cfg.schedule == "none":
        return 1.0
    raise ValueError(f"unknown schedule {cfg.schedule!r}; expected cosine, step or none")


def _phases(cfg: TrainConfig) -> list[tuple[str, int, float]]:
    """(strategy, epochs, lr) per phase; lp_ft is a probe phase then a full phase."""
    if cfg.strategy == "lp_ft":
        lp = cfg.lp_epochs or max(cfg.epochs // 3, 1)
        return [("linear_probe", lp, cfg.lp_lr or cfg.lr * 10), ("full", max(cfg.epochs - lp, 1), cfg.lr)]
    return [(cfg.strategy, cfg.epochs, cfg.lr)]


def _read_resume(path: Path, key: dict, name: str, log) -> dict | None:
    """The resume state in ``path`` when it was written for ``key``; else None (and the file is deleted)."""
    log = log or (print if runtime.is_main() else (lambda *a, **k: None))
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        why = (
            None if st.get("key") == key else "the configuration or the parent checkpoint changed since it was written"
        )
    except Exception as e:  # a torn or foreign file: not a state to continue from
        st, why = None, f"it cannot be read ({type(e).__name__})"
    if why is None:
        return st
    log(f"[{name}] ignoring the resume file {path.name}: {why}; training from scratch")
    runtime.barrier()  # every rank has read it before rank 0 deletes it
    if runtime.is_main():
        path.unlink(missing_ok=True)
    return None


def train(
    model: nn.Module,
    train_set: Any,
    val_set: Any | None,
    cfg: TrainConfig,
    resume_path: str | os.PathLike | None = None,
    desc: str = "train",
    progress: bool = True,
    resume_key: dict | None = None,
    log=None,
    stage: str | None = None,
) -> TrainResult:
    """Train ``model`` under ``cfg.strategy``. Returns the model with the best validation weights.

    ``resume_path``: a file where the state after each finished epoch is kept; when it
    exists at start, training continues from there (it is deleted on success). It holds
    only tensors and plain values and is read with ``torch.load(weights_only=True)``.
    ``resume_key`` (e.g. the configuration hash and the parent checkpoint's sha256) is stored in
    it; a resume file whose key differs (the configuration or the parent changed), or that cannot
    be read, is deleted with a log line and training starts from scratch. The early-stopping
    counter is part of the resumed state.
    Under ``torch.distributed`` the model is wrapped in DistributedDataParallel (with
    SyncBatchNorm when ``cfg.sync_bn``, CUDA only) and the data in a DistributedSampler
    (``cfg.batch_size`` per rank); validation is sharded by batch and its sums reduced, the
    epoch's training loss and accuracy are reduced over ranks, and every rank ends with rank
    0's weights and buffers. Only rank 0 writes the resume file.
    """
    from tunelens.core.naming import head_name

    device = runtime.resolve_device(cfg.device)
    runtime.set_determinism(cfg.seed)
    model.to(device)
    nhwc = cfg.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if nhwc:  # undone before returning: the saved weights are contiguous
        model.to(memory_format=torch.channels_last)
    distributed = runtime.is_distributed()
    if cfg.amp and device.type != "cuda" and runtime.is_main():
        warnings.warn(f"amp=True is ignored on {device.type}: bf16 autocast is only used on CUDA", stacklevel=2)
    sync_bn = cfg.sync_bn and distributed
    if sync_bn and device.type != "cuda":
        if runtime.is_main():
            warnings.warn(
                "sync_bn=True is ignored on CPU (torch's SyncBatchNorm runs on GPUs only): each rank "
                "normalises with its own batch statistics",
                stacklevel=2,
            )
        sync_bn = False
    bn_classes: dict[str, type] = {}
    if sync_bn:
        bn_classes = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    head = head_name(model)
    stages = stage_order(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = gen if not distributed else torch.Generator().manual_seed(cfg.seed + 1_000_003 * runtime.rank())
    sampler: Any = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed, drop_last=True)
    n_local = len(sampler) if sampler is not None else len(train_set)  # this rank's training samples
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen,
        drop_last=n_local > cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    if len(loader) == 0:
        raise ValueError(
            f"no training batch: {len(train_set)} training samples over {runtime.world_size()} "
            f"rank(s) with batch_size {cfg.batch_size}"
        )
    val_loader = None
    if val_set is not None:
        # the same batches as one process, no sample padded or repeated: reduced sums equal one process's
        val_loader = runtime.shard_loader(val_set, 256, device=device)
    phases = _phases(cfg)
    total_epochs = sum(e for _, e, _ in phases)
    history: list[dict] = []
    best: dict[str, Any] = {"acc": -1.0, "state": None, "epoch": -1}
    start_epoch = 0
    resume_path = Path(resume_path) if resume_path else None
    opt_state = None
    stale = 0
    key = {"train_config": cfg.to_dict(), **(resume_key or {})}
    if resume_path and resume_path.exists():
        st = _read_resume(resume_path, key, desc.strip(), log)
        if st is not None:
            model.load_state_dict(st["model"])
            history, start_epoch, opt_state = st["history"], st["epoch"], st["optimizer"]
            best = {"acc": st["best_acc"], "state": st["best_state"], "epoch": st["best_epoch"]}
            stale = int(st.get("stale", 0))
            gen.set_state(st["gen"])
            torch.set_rng_state(st["rng"])
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(
        total=total_epochs * len(loader),
        initial=start_epoch * len(loader),
        desc=desc,
        disable=not progress or not runtime.is_main() or run_line.active(),
        dynamic_ncols=True,
        leave=False,
    )
    epoch0 = 0
    trainable = 0
    for phase_strategy, phase_epochs, lr in phases:
        if start_epoch >= epoch0 + phase_epochs or (
            start_epoch > epoch0 and cfg.patience and stale >= cfg.patience  # stopped early before the kill
        ):
            epoch0 += phase_epochs
            continue
        prefixes = trainable_prefixes(model, phase_strategy, cfg.last_k)
        apply_freeze(model, prefixes)
        trainable = max(trainable, sum(p.numel() for p in model.parameters() if p.requires_grad))
        net: nn.Module = model
        if distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        phase_loader, phase_val = loader, val_loader
        if cacheable(model, cfg, phase_strategy, head, device):
            # the head trains on the frozen backbone's features, computed once (train split in the training modes)
            set_train_mode(model, prefixes)
            feats = head_inputs(model, head, train_set, device)
            phase_loader = DataLoader(
                feats, batch_size=cfg.batch_size, shuffle=True, generator=gen, drop_last=n_local > cfg.batch_size
            )
            if val_set is not None:
                model.eval()
                phase_val = DataLoader(head_inputs(model, head, val_set, device), batch_size=256, shuffle=False)
            net = model.get_submodule(head)
        opt = _make_optimizer(model, cfg, lr, head)
        named = list(model.named_parameters())
        stage_pos = {s: i for i, s in enumerate(stages)}
        if len(phases) > 1 and epoch0 > 0 and start_epoch <= epoch0:
            best, stale = {"acc": -1.0, "state": None, "epoch": -1}, 0  # model selection within the last phase
        if opt_state is not None and start_epoch > epoch0:
            opt.load_state_dict(opt_state)
        for epoch in range(max(start_epoch, epoch0), epoch0 + phase_epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            set_train_mode(model, prefixes)
            sums = {"loss": 0.0, "correct": 0, "n": 0}
            gnorm = {s: 0.0 for s in stages}
            uratio = {s: 0.0 for s in stages}
            nsteps = 0
            for step, batch in enumerate(phase_loader):
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * _lr_factor(cfg, epoch - epoch0, step, len(phase_loader), phase_epochs)
                x = batch[0].to(device, non_blocking=True)
                y = batch[1].to(device, non_blocking=True)
                if cfg.augment:
                    x = augment_batch(x, aug_gen)
                if nhwc and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                    out = net(x)
                    loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # per-stage gradient norm and update ratio ||step|| / ||theta||: a few fused kernels and one sync
                live = [(stage_pos[s], p) for n, p in named if p.grad is not None and (s := stage_of(n)) in stage_pos]
                ps = [p.detach() for _, p in live]
                pos = torch.tensor([i for i, _ in live], dtype=torch.long)
                before = [p.clone() for p in ps]
                opt.step()
                if live:  # (the gradients are still there after the step)
                    gsq = (
                        torch.stack(torch._foreach_norm([gr for _, p in live if (gr := p.grad) is not None]))
                        .double()
                        .cpu()
                        ** 2
                    )
                    dsq = torch.stack(torch._foreach_norm(torch._foreach_sub(ps, before))).double().cpu() ** 2
                    bsq = torch.stack(torch._foreach_norm(before)).double().cpu() ** 2
                    zero = torch.zeros(len(stages), dtype=torch.float64)
                    g_st, d_st, b_st = (zero.index_add(0, pos, v).tolist() for v in (gsq, dsq, bsq))
                    for i, s in enumerate(stages):
                        gnorm[s] += g_st[i]
                        uratio[s] += (d_st[i] ** 0.5) / (b_st[i] ** 0.5) if b_st[i] > 0 else 0.0
                nsteps += 1
                sums["loss"] += float(loss.detach()) * len(y)
                sums["correct"] += int((out.argmax(1) == y).sum())
                sums["n"] += len(y)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
            if distributed:  # the epoch's training loss and accuracy over all ranks' samples
                tot = runtime.all_reduce_sum(
                    torch.tensor([sums["loss"], sums["correct"], sums["n"]], dtype=torch.float64, device=device)
                ).tolist()
                sums = {"loss": tot[0], "correct": int(round(tot[1])), "n": int(round(tot[2]))}
                runtime.broadcast_module(model, parameters=False)  # BatchNorm statistics: rank 0's everywhere
            # gnorm holds sums of squared norms over steps: report mean per-step norm (sqrt of mean square)
            rec = {
                "epoch": epoch + 1,
                "phase": phase_strategy,
                "lr": lr,
                "train_loss": sums["loss"] / max(sums["n"], 1),
                "train_acc": sums["correct"] / max(sums["n"], 1),
                "grad_norm": {s: (gnorm[s] / max(nsteps, 1)) ** 0.5 for s in stages},
                "update_ratio": {s: uratio[s] / max(nsteps, 1) for s in stages},
            }
            if phase_val is not None:
                v = evaluate(net if phase_val is not val_loader else model, phase_val, device)
                rec.update(val_loss=v["loss"], val_acc=v["acc"])
                if v["acc"] > best["acc"]:
                    best = {
                        "acc": v["acc"],
                        "state": copy.deepcopy({k: t.cpu() for k, t in model.state_dict().items()}),
                        "epoch": epoch + 1,
                    }
                    stale = 0
                else:
                    stale += 1
            history.append(rec)
            if stage:  # the run's progress line (tunelens.core.progress), when one is shown
                run_line.report(stage, (epoch + 1) / max(total_epochs, 1), label=f"epoch {epoch + 1}/{total_epochs}")
            if resume_path and runtime.is_main():
                from tunelens.core.files import atomic_replace

                st = {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "history": history,
                    "epoch": epoch + 1,
                    "best_acc": best["acc"],
                    "best_state": best["state"],
                    "best_epoch": best["epoch"],
                    "gen": gen.get_state(),
                    "rng": torch.get_rng_state(),
                    "stale": stale,
                    "key": key,
                }
                atomic_replace(resume_path, lambda tmp, st=st: torch.save(st, tmp))
            if cfg.patience and stale >= cfg.patience:
                break  # early stopping (in lp_ft this ends the current phase)
        epoch0 += phase_epochs
        opt_state = None
    bar.close()
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    if sync_bn:
        model = _revert_sync_batchnorm(model, bn_classes)
    runtime.broadcast_module(model)  # every rank holds exactly what rank 0 saves
    apply_freeze(model, None)
    model.eval()
    if nhwc:
        model.to(memory_format=torch.contiguous_format)
    res = TrainResult(
        model=model,
        history=history,
        best_epoch=best["epoch"],
        seconds=time.perf_counter() - t0,
        trainable_params=trainable,
    )
    if device.type == "cuda":
        res.peak_gpu_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20
    if resume_path and resume_path.exists() and runtime.is_main():
        resume_path.unlink()
    return res
