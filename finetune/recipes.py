"""The default run's fine-tuning stage: pretrain on the source task, then fine-tune with each strategy.

For text (``--preset text``) the base is the pretrained Hugging Face encoder as shipped, with a head probed
on the source task (its encoder weights stay exactly the pretrained ones).

Writes ``checkpoints/base`` (pretrained on the source task), one checkpoint per
strategy (``linear_probe``, ``full``, ``lp_ft`` ... on the target task) and the
``scratch`` control (random initialisation, the fine-tuning budget), each as
safetensors + manifest, plus a run-level ``checkpoints/manifest.json``.
A checkpoint whose manifest carries the same configuration hash (and parent
weights) is not recomputed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tunelens.core import runtime
from tunelens.core.evaluation import evaluate
from tunelens.core.files import atomic_write_text
from tunelens.core.text import build_text_model, load_tokenizer, resolve_hf_folder

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .data import ShapesSpec, make_shapes
from .models import build_model, replace_head
from .text_data import TextSpec, make_text_task
from .train import TrainConfig, train

__all__ = ["data_spec", "is_text", "load_run_models", "make_data", "run_finetune_stage"]


def is_text(cfg: dict) -> bool:
    """Whether the configuration is of the text modality (``--preset text``)."""
    return cfg.get("modality", "image") == "text"


def data_spec(cfg: dict, task: str) -> ShapesSpec | TextSpec:
    d = cfg["data"]
    if is_text(cfg):
        t = d["text"]
        return TextSpec(task=task, seed=cfg["seed"], max_len=t["max_len"], model=cfg["arch"], **t[task])
    return ShapesSpec(task=task, image_size=d["image_size"], clutter=d["clutter"], seed=cfg["seed"], **d[task])


def make_data(cfg: dict, spec: ShapesSpec | TextSpec) -> dict:
    """The splits of ``spec``: generated shapes, or generated sentences tokenised for the configured model."""
    if isinstance(spec, TextSpec):
        return make_text_task(spec, load_tokenizer(resolve_hf_folder(spec.model)))
    return make_shapes(spec)


def _cached(path: Path, key: str) -> dict | None:
    if not path.exists() or not path.with_suffix(".json").exists():
        return None
    try:
        _, man = load_checkpoint(path)
    except CheckpointError:
        return None
    return man if man.get("config_hash") == key else None


def _train_and_save(
    name: str, model: torch.nn.Module, data: dict, tcfg: TrainConfig, path: Path, meta: dict, progress: bool
) -> dict:
    res = train(
        model,
        data["train"],
        data["val"],
        tcfg,
        resume_path=path.with_suffix(".resume.pt"),
        desc=f"{name:>12}",
        progress=progress,
    )
    device = runtime.resolve_device(tcfg.device)
    metrics = {}
    for split in ("val", "test"):  # sharded by batch under torch.distributed, sums reduced: one process's numbers
        metrics.update(
            {
                f"{split}_{k}": v
                for k, v in evaluate(res.model, runtime.shard_loader(data[split], 256, device=device), device).items()
            }
        )
    from tunelens.core.naming import stage_order

    peak = res.peak_gpu_mem_mb
    if peak is not None and runtime.is_distributed():  # the largest over ranks
        peak = max(p for p in runtime.all_gather_objects(peak) if p is not None)
    man = dict(
        meta,
        stage_order=stage_order(res.model),
        train_config=tcfg.to_dict(),
        metrics=dict(metrics, best_epoch=res.best_epoch),
        history=res.history,
        seconds=round(res.seconds, 3),
        device=runtime.device_name(tcfg.device),
        peak_gpu_mem_mb=peak,
        world_size=runtime.world_size(),
    )
    if runtime.is_main():
        try:
            man = save_checkpoint(path, res.model.state_dict(), man)
        except BaseException:
            # never leave half a checkpoint (weights renamed into place, manifest not): remove both
            for p in (path, path.with_suffix(".json")):
                p.unlink(missing_ok=True)
            raise
    runtime.barrier()
    if not runtime.is_main():
        _, man = load_checkpoint(path)
    return man


def run_finetune_stage(cfg: dict, out: str | Path, progress: bool = True, log=print) -> dict[str, dict]:
    """Pretrain + fine-tune per the configuration; return ``{name: manifest}``."""
    from tunelens.core.hashing import code_hash, config_hash

    from .strategies import STRATEGIES

    ckdir = Path(out) / "checkpoints"
    seed, arch = cfg["seed"], cfg["arch"]
    device = runtime.device_name(cfg.get("device", "auto"))  # the same on every rank: cache keys agree
    src_spec, tgt_spec = data_spec(cfg, "source"), data_spec(cfg, "target")
    t0 = time.perf_counter()
    src, tgt = make_data(cfg, src_spec), make_data(cfg, tgt_spec)
    unit = "sentences" if is_text(cfg) else "images"
    log(
        f"[finetune] generated data in {time.perf_counter() - t0:.1f}s "
        f"(source {len(src['train'])} train {unit}, target {len(tgt['train'])} train {unit})"
    )
    manifests: dict[str, dict] = {}

    code = code_hash("tunelens.finetune") + code_hash("tunelens.core")
    base_key = config_hash("base", arch, seed, src_spec.to_dict(), cfg["pretrain"], code, device)
    base_path = ckdir / "base.safetensors"
    man = _cached(base_path, base_key)
    if man is None:
        if is_text(cfg):  # the pretrained encoder as shipped, with a head probed on the source task
            tcfg = TrainConfig(**dict(cfg["pretrain"], strategy="linear_probe", seed=seed, device=device))
            model = build_text_model(arch, len(src_spec.classes), seed=seed, pretrained=True)
        else:
            tcfg = TrainConfig(**dict(cfg["pretrain"], strategy="full", seed=seed, device=device))
            model = build_model(arch, len(src_spec.classes), seed=seed)
        meta = {
            "name": "base",
            "role": "base",
            "arch": arch,
            "num_classes": len(src_spec.classes),
            "classes": list(src_spec.classes),
            "strategy": "pretrain",
            "data": src_spec.to_dict(),
            "seed": seed,
            "config_hash": base_key,
        }
        man = _train_and_save("pretrain", model, src, tcfg, base_path, meta, progress)
        log(f"[finetune] pretrained base in {man['seconds']:.1f}s: source test acc {man['metrics']['test_acc']:.3f}")
    else:
        log("[finetune] base unchanged, kept")
    manifests["base"] = man
    base_sd, _ = load_checkpoint(base_path)

    names = list(cfg["finetune"]["strategies"]) + ["scratch"]
    for strat in names:
        if strat not in STRATEGIES:
            raise ValueError(f"unknown strategy {strat!r} in finetune.strategies; expected {', '.join(STRATEGIES)}")
        opts = dict(cfg["finetune"]["common"], **cfg["finetune"].get(strat, {}))
        tcfg = TrainConfig(**dict(opts, strategy=strat, seed=seed + 1, device=device))
        key = config_hash(
            strat, arch, seed, tgt_spec.to_dict(), tcfg.to_dict(), code, None if strat == "scratch" else man["sha256"]
        )
        path = ckdir / f"{strat}.safetensors"
        got = _cached(path, key)
        if got is None:
            if strat == "scratch":
                model = build_model(arch, len(tgt_spec.classes), seed=seed + 1)
            else:
                model = build_model(arch, len(src_spec.classes), seed=seed)
                model.load_state_dict(base_sd)
                replace_head(model, len(tgt_spec.classes), seed=seed + 1)
            meta = {
                "name": strat,
                "role": "control" if strat == "scratch" else "tuned",
                "arch": arch,
                "num_classes": len(tgt_spec.classes),
                "classes": list(tgt_spec.classes),
                "strategy": strat,
                "data": tgt_spec.to_dict(),
                "seed": seed + 1,
                "config_hash": key,
                "parent": None if strat == "scratch" else {"name": "base", "sha256": man["sha256"]},
            }
            got = _train_and_save(strat, model, tgt, tcfg, path, meta, progress)
            log(f"[finetune] {strat} in {got['seconds']:.1f}s: target test acc {got['metrics']['test_acc']:.3f}")
        else:
            log(f"[finetune] {strat} unchanged, kept")
        manifests[strat] = got
    index = {
        n: {
            "file": m["file"],
            "sha256": m["sha256"],
            "role": m["role"],
            "strategy": m["strategy"],
            "test_acc": m["metrics"]["test_acc"],
        }
        for n, m in manifests.items()
    }
    if runtime.is_main():
        atomic_write_text(ckdir / "manifest.json", json.dumps({"checkpoints": index}, indent=2, sort_keys=True))
    runtime.barrier()
    return manifests


def load_run_models(
    ckdir: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    """Load every checkpoint listed in ``ckdir/manifest.json`` (verified against its sha256)."""
    ckdir = Path(ckdir)
    idx_path = ckdir / "manifest.json"
    if not idx_path.exists():
        raise FileNotFoundError(f"{idx_path} not found: run `tunelens finetune` first (or `tunelens run`)")
    index = json.loads(idx_path.read_text())["checkpoints"]
    models, mans = {}, {}
    for name, entry in index.items():
        sd, man = load_checkpoint(ckdir / entry["file"])
        model = build_model(man["arch"], man["num_classes"])
        model.load_state_dict(sd)
        models[name] = model.to(device).eval()
        mans[name] = man
    return models, mans
