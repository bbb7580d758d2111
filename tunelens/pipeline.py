"""The default pipeline: finetune -> analyze -> report, each stage from the previous stage's files.

Each stage is skipped when its inputs and configuration are unchanged: checkpoints
carry a configuration hash in their manifest, the results folder carries the hash
of the analysis configuration and of every checkpoint it read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tunelens.config import code_hash, config_hash
from tunelens.core import runtime
from tunelens.core.files import versions
from tunelens.finetune.data import make_shapes
from tunelens.finetune.recipes import data_spec, is_text, load_run_models, make_data, run_finetune_stage


def random_like(manifest: dict):
    """A builder of the base architecture with fresh random weights, initialised the way the architecture
    initialises itself (the random-weights baseline of CKA); None when tunelens cannot build it."""
    from tunelens.finetune.models import build_model

    def build(seed: int):
        try:
            return build_model(manifest["arch"], int(manifest["num_classes"]), seed=seed)
        except Exception:  # a factory that cannot be rebuilt: the analysis resets the parameters instead
            return None

    return build


__all__ = ["run_all", "stage_analyze", "stage_finetune", "stage_report"]


def stage_finetune(cfg: dict, out: Path, progress: bool = True, log=print) -> dict:
    return run_finetune_stage(cfg, out, progress=progress, log=log)


def stage_analyze(cfg: dict, out: Path, progress: bool = True, log=print, force: bool = False) -> Path:
    from tunelens.analysis.suite import analyze_models

    out = Path(out)
    res_dir = out / "results"
    ck_index = out / "checkpoints" / "manifest.json"
    if not ck_index.exists():
        raise FileNotFoundError(f"{ck_index} not found: run `tunelens finetune --out {out}` first")
    index = json.loads(ck_index.read_text())["checkpoints"]
    key = config_hash(
        "analysis",
        cfg["analysis"],
        cfg["seed"],
        {n: e["sha256"] for n, e in sorted(index.items())},
        code_hash("tunelens.analysis") + code_hash("tunelens.core"),
    )
    if not force and (res_dir / "summary.json").exists():
        try:
            if json.loads((res_dir / "summary.json").read_text()).get("key") == key:
                log("[analyze] results unchanged, kept")
                return res_dir
        except json.JSONDecodeError:
            pass
    device = runtime.resolve_device(cfg.get("device", "auto"))
    runtime.set_determinism(cfg["seed"])
    t0 = time.perf_counter()
    models, mans = load_run_models(out / "checkpoints", device=device)
    tman = next(m for m in mans.values() if m["role"] == "tuned")
    if is_text(cfg):
        return _analyze_text(cfg, out, models, mans, device, key, progress, log, t0)
    tspec = data_spec(cfg, "target") if "target" in cfg.get("data", {}) else None
    if tspec is None or tspec.to_dict() != tman["data"]:
        from tunelens.finetune.data import ShapesSpec

        d = dict(tman["data"])
        d.pop("name", None)
        d["classes"] = tuple(d["classes"])
        tspec = ShapesSpec(**d)
    data = make_shapes(tspec)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with runtime.no_tf32():
        res = analyze_models(
            models,
            mans,
            data,
            cfg["analysis"],
            device=device,
            seed=cfg["seed"],
            log=log,
            progress=progress,
            random_like=random_like(mans["base"]),
        )
    res.summary.update(
        key=key,
        config=cfg,
        versions=versions(),
        checkpoints={
            n: {
                "file": m["file"],
                "sha256": m["sha256"],
                "strategy": m["strategy"],
                "seed": m["seed"],
                "train_seconds": m.get("seconds"),
            }
            for n, m in mans.items()
        },
        data={
            "description": f"generated shapes on cluttered backgrounds (embedded default, seed {tspec.seed}).",
            "classes": list(tspec.classes),
            "image_size": tspec.image_size,
            "n_train": len(data["train"]),
            "n_test": len(data["test"]),
            "spec": tspec.to_dict(),
        },
        base_description=f"{mans['base']['arch']} pretrained on {len(mans['base']['classes'])} source shapes "
        f"({', '.join(mans['base']['classes'])}), source test accuracy "
        f"{100 * mans['base']['metrics']['test_acc']:.1f}%.",
    )
    res.summary["world_size"] = runtime.world_size()
    if device.type == "cuda":
        res.summary["analysis_peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    res.summary["timings"]["training"] = sum(m.get("seconds") or 0 for m in mans.values())
    res.summary["timings"]["analyze_total"] = time.perf_counter() - t0
    if runtime.is_main():
        res.save(res_dir)
    runtime.barrier()
    log(f"[analyze] done in {time.perf_counter() - t0:.1f}s -> {res_dir}")
    return res_dir


def _analyze_text(cfg: dict, out: Path, models, mans, device, key: str, progress: bool, log, t0: float) -> Path:
    """The analyze stage for ``--preset text``: the generated sentences of the tuned models' manifest."""
    from tunelens.analysis.suite import analyze_models
    from tunelens.finetune.text_data import TextSpec

    tman = next(m for m in mans.values() if m["role"] == "tuned")
    fields = {k: v for k, v in tman["data"].items() if k not in ("name", "classes")}
    tspec = TextSpec(**fields)
    data = make_data(cfg, tspec)
    with runtime.no_tf32():
        res = analyze_models(
            models,
            mans,
            data,
            cfg["analysis"],
            device=device,
            seed=cfg["seed"],
            log=log,
            progress=progress,
            random_like=random_like(mans["base"]),
        )
    base = mans["base"]
    res.summary.update(
        key=key,
        config=cfg,
        versions=versions(),
        modality="text",
        checkpoints={
            n: {
                "file": m["file"],
                "sha256": m["sha256"],
                "strategy": m["strategy"],
                "seed": m["seed"],
                "train_seconds": m.get("seconds"),
            }
            for n, m in mans.items()
        },
        data={
            "description": "generated review sentences (embedded default, seed "
            f"{tspec.seed}): the label is the polarity of the last clause, flipped by 'not'; the decisive "
            "tokens (that adjective and its 'not') are known per sentence.",
            "classes": list(tspec.classes),
            "unit": "sentences",
            "max_len": tspec.max_len,
            "n_train": len(data["train"]),
            "n_test": len(data["test"]),
            "spec": tspec.to_dict(),
        },
        base_description=f"{base['arch']} (all-MiniLM-L6-v2, a 6-layer BERT) as pretrained, with a linear head "
        f"probed on the {len(base['classes'])}-topic source task ({', '.join(base['classes'])}), source test "
        f"accuracy {100 * base['metrics']['test_acc']:.1f}%.",
    )
    res.summary["world_size"] = runtime.world_size()
    res.summary["timings"]["training"] = sum(m.get("seconds") or 0 for m in mans.values())
    res.summary["timings"]["analyze_total"] = time.perf_counter() - t0
    if runtime.is_main():
        res.save(out / "results")
    runtime.barrier()
    log(f"[analyze] done in {time.perf_counter() - t0:.1f}s -> {out / 'results'}")
    return out / "results"


def stage_report(out: Path, log=print) -> Path:
    from tunelens.reports.render import render_report

    out = Path(out)
    t0 = time.perf_counter()
    path = render_report(out / "results", out / "report")
    log(f"[report] rendered in {time.perf_counter() - t0:.1f}s")
    return path


def run_all(cfg: dict, out: Path, progress: bool = True, log=print) -> Path:
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    stage_finetune(cfg, out, progress=progress, log=log)
    stage_analyze(cfg, out, progress=progress, log=log)
    path = None
    if runtime.is_main():
        path = stage_report(out, log=log)
    runtime.barrier()
    return path
