"""The default run's fine-tuning stage: pretrain on the source task, then fine-tune with each strategy.

For text (``--preset text``) the base is the pretrained Hugging Face encoder as shipped, with a head probed
on the source task (its encoder weights stay exactly the pretrained ones).

Writes ``checkpoints/base`` (pretrained on the source task, or, when the configuration names
``base_weights``, real pretrained weights such as EfficientNet-Lite0's ImageNet weights, see
:mod:`tunelens.core.pretrained`: then no pretraining stage runs), one checkpoint per
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
from typing import Any

import torch

from tunelens.core import progress as run_line
from tunelens.core import runtime
from tunelens.core.evaluation import evaluate
from tunelens.core.files import atomic_write_text, check_owned_folder, claim_folder
from tunelens.core.naming import head_name
from tunelens.core.text import build_text_model, load_tokenizer, resolve_hf_folder

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .data import STD, ShapesSpec, make_shapes
from .lora import LORA_KEYS, add_lora, merge_lora, save_adapter
from .models import build_model, replace_head
from .real_data import FashionSpec, make_fashion_mnist
from .shipped import SHIPPED, pretrain_code_hash, shipped_base, shipped_key
from .text_data import TextSpec, make_text_task
from .train import TrainConfig, train

__all__ = [
    "data_spec",
    "is_text",
    "load_run_models",
    "make_data",
    "make_shipped_base",
    "read_run_index",
    "run_finetune_stage",
]


def is_text(cfg: dict) -> bool:
    """Whether the configuration is of the text modality (``--preset text``)."""
    return cfg.get("modality", "image") == "text"


def data_spec(cfg: dict, task: str) -> ShapesSpec | TextSpec:
    d = cfg["data"]
    if is_text(cfg):
        t = d["text"]
        # real sentences (Rotten Tomatoes) for the target task only: the source task stays the generated topics
        real = t.get("dataset", "generated") if task == "target" else "generated"
        return TextSpec(task=task, seed=cfg["seed"], max_len=t["max_len"], model=cfg["arch"], dataset=real, **t[task])
    # real photos (Fashion-MNIST) for the target task only: a source task (pretraining) stays the shapes
    cls = FashionSpec if task == "target" and d.get("dataset", "shapes") == "fashion_mnist" else ShapesSpec
    return cls(
        task=task,
        image_size=d["image_size"],
        clutter=d["clutter"],
        std=d.get("std", STD[0]),
        seed=cfg["seed"],
        **d[task],
    )


def _real(spec: ShapesSpec | TextSpec) -> bool:
    """Whether ``spec`` reads real data (Fashion-MNIST, Rotten Tomatoes) rather than generating it."""
    return isinstance(spec, FashionSpec) or getattr(spec, "dataset", "generated") != "generated"


def make_data(cfg: dict, spec: ShapesSpec | TextSpec) -> dict:
    """The splits of ``spec``: generated shapes, or generated sentences tokenised for the configured model."""
    if isinstance(spec, TextSpec):
        return make_text_task(spec, load_tokenizer(resolve_hf_folder(spec.model)))
    if isinstance(spec, FashionSpec):
        return make_fashion_mnist(spec)
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
    name: str,
    model: torch.nn.Module,
    data: dict,
    tcfg: TrainConfig,
    path: Path,
    meta: dict,
    progress: bool,
    log=print,
    finish=None,
) -> dict:
    """Train, evaluate and save. ``finish(model) -> model`` turns the trained model into the one saved
    (LoRA: save the adapter, merge it); it runs on every rank (it writes only on the main one)."""
    # a resume file continues only the training it was written for: the same configuration, the same parent
    parent = meta.get("parent") or {}
    res = train(
        model,
        data["train"],
        data["val"],
        tcfg,
        resume_path=path.with_suffix(".resume.pt"),
        desc=f"{name:>12}",
        progress=progress,
        resume_key={"config_hash": meta["config_hash"], "parent_sha256": parent.get("sha256")},
        log=log,
        stage=name,
    )
    if finish is not None:
        res.model = finish(res.model)
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
        trainable_params=res.trainable_params,
        device=runtime.device_name(tcfg.device),
        peak_gpu_mem_mb=peak,
        world_size=runtime.world_size(),
    )
    return _save_on_main(path, res.model.state_dict(), man)


def _save_on_main(path: Path, state_dict: dict, man: dict) -> dict:
    """Save the checkpoint on the main rank (every rank returns the manifest as written); a save that fails
    leaves no half checkpoint (weights renamed into place, manifest not): both files are removed."""
    if runtime.is_main():
        try:
            man = save_checkpoint(path, state_dict, man)
        except BaseException:
            for p in (path, path.with_suffix(".json")):
                p.unlink(missing_ok=True)
            raise
    runtime.barrier()
    if not runtime.is_main():
        _, man = load_checkpoint(path)
    return man


def _save_and_merge(peft_model, folder: Path) -> torch.nn.Module:
    """Write the trained adapter (main rank, swapped into place whole) and return the merged plain model."""
    import shutil

    if runtime.is_main():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(peft_model, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return merge_lora(peft_model)


def run_finetune_stage(cfg: dict, out: str | Path, progress: bool = True, log=print) -> dict[str, dict]:
    """Pretrain + fine-tune per the configuration; return ``{name: manifest}``."""
    from tunelens.core.hashing import code_hash, config_hash

    from .strategies import STRATEGIES

    ckdir = Path(out) / "checkpoints"
    # tunelens overwrites (and, after a failed save, removes) files here: only in a folder it created
    check_owned_folder(ckdir)
    runtime.barrier()  # every rank checked before rank 0 creates the folder and its marker
    if runtime.is_main():
        claim_folder(ckdir)
    runtime.barrier()
    seed, arch = cfg["seed"], cfg["arch"]
    device = runtime.device_name(cfg.get("device", "auto"))  # the same on every rank: cache keys agree
    src_spec, tgt_spec = data_spec(cfg, "source"), data_spec(cfg, "target")
    weights = cfg.get("base_weights")
    t0 = time.perf_counter()
    src = None if weights else make_data(cfg, src_spec)
    tgt = make_data(cfg, tgt_spec)
    run_line.report("data")
    unit = "sentences" if is_text(cfg) else "images"
    size = (
        f" of {tgt_spec.image_size} px" if isinstance(tgt_spec, ShapesSpec) else f" of up to {tgt_spec.max_len} tokens"
    )
    log(
        f"[finetune] {'read' if _real(src_spec) or _real(tgt_spec) else 'generated'} data in "
        f"{time.perf_counter() - t0:.1f}s ("
        + (f"source {len(src['train'])} train {unit}, " if src else "")
        + f"target {len(tgt['train'])} train {unit}{size})"
    )
    manifests: dict[str, dict] = {}

    code = code_hash("tunelens.finetune") + code_hash("tunelens.core")
    base_path = ckdir / "base.safetensors"
    if weights:
        if not isinstance(tgt_spec, ShapesSpec):
            raise ValueError("base_weights (real pretrained image weights) need image data, not the text modality")
        man = _pretrained_base(weights, arch, seed, code, base_path, log, input_std=tgt_spec.std)
    else:
        assert src is not None  # a base that is pretrained here has source data
        man = _pretrain_base(cfg, arch, seed, device, src_spec, src, code, base_path, progress, log)
    manifests["base"] = man
    base_sd, _ = load_checkpoint(base_path)

    names = list(cfg["finetune"]["strategies"]) + ["scratch"]
    for strat in names:
        if strat not in STRATEGIES:
            raise ValueError(f"unknown strategy {strat!r} in finetune.strategies; expected {', '.join(STRATEGIES)}")
        opts = dict(cfg["finetune"]["common"], **cfg["finetune"].get(strat, {}))
        lora_opts = {k: opts.pop(k) for k in LORA_KEYS if k in opts}
        tcfg = TrainConfig(**dict(opts, strategy=strat, seed=seed + 1, device=device))
        key = config_hash(
            strat,
            arch,
            seed,
            tgt_spec.to_dict(),
            tcfg.to_dict(),
            code,
            None if strat == "scratch" else man["sha256"],
            *([lora_opts] if strat == "lora" else []),
        )
        path = ckdir / f"{strat}.safetensors"
        got = _cached(path, key)
        adapter_dir = ckdir / f"{strat}_adapter"
        if got is not None and strat == "lora" and not (adapter_dir / "adapter_model.safetensors").exists():
            got = None  # the adapter beside the merged weights is part of the checkpoint
        if got is None:
            if strat == "scratch":
                model = build_model(arch, len(tgt_spec.classes), seed=seed + 1)
            else:
                model = build_model(arch, int(man["num_classes"]), seed=seed)
                model.load_state_dict(base_sd)
                replace_head(model, len(tgt_spec.classes), seed=seed + 1)
            finish, train_model = None, model
            if strat == "lora":
                peft_model = add_lora(
                    model, int(lora_opts["rank"]), float(lora_opts["alpha"]), list(lora_opts["stages"]), seed=seed + 1
                )
                finish = lambda m, pm=peft_model, d=adapter_dir: _save_and_merge(pm, d)
                train_model = peft_model.base_model.model
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
            if strat != "scratch":  # the base's head (source shapes or ImageNet's 1000 classes) was replaced
                meta["head"] = {
                    "name": head_name(model),
                    "replaced": f"{man['num_classes']} -> {len(tgt_spec.classes)} classes",
                    "base_weights": (man.get("pretrained") or {}).get("name"),
                }
            if strat == "lora":
                meta["lora"] = dict(lora_opts, adapter=adapter_dir.name)
            got = _train_and_save(strat, train_model, tgt, tcfg, path, meta, progress, log=log, finish=finish)
            log(f"[finetune] {strat} in {got['seconds']:.1f}s: target test acc {got['metrics']['test_acc']:.3f}")
        else:
            log(f"[finetune] {strat} unchanged, kept")
            run_line.replan(strat, 0.0)
        manifests[strat] = got
    index = {
        n: {
            "file": m["file"],
            "sha256": m["sha256"],
            "role": m["role"],
            "strategy": m["strategy"],
            "test_acc": m["metrics"].get("test_acc"),
        }
        for n, m in manifests.items()
    }
    if runtime.is_main():
        atomic_write_text(ckdir / "manifest.json", json.dumps({"checkpoints": index}, indent=2, sort_keys=True))
    runtime.barrier()
    return manifests


def _pretrain_base(
    cfg: dict,
    arch: str,
    seed: int,
    device: str,
    src_spec: ShapesSpec | TextSpec,
    src: dict,
    code: str,
    path: Path,
    progress,
    log,
) -> dict:
    """The base model pretrained on the source shapes, or for text the pretrained encoder as shipped with a head
    probed on the source task (kept when its configuration hash is unchanged)."""
    from tunelens.core.hashing import config_hash

    key = config_hash("base", arch, seed, src_spec.to_dict(), cfg["pretrain"], code, device)
    man = _cached(path, key)
    if man is not None:
        log("[finetune] base unchanged, kept")
        run_line.replan("pretrain", 0.0)
        return man
    settings = {k: v for k, v in cfg["pretrain"].items() if k != "use_shipped"}
    if not is_text(cfg) and cfg["pretrain"].get("use_shipped", True):
        man = _from_shipped(shipped_key(arch, seed, src_spec.to_dict(), cfg["pretrain"]), key, path, log)
        if man is not None:
            return man
    if is_text(cfg):  # the pretrained encoder as shipped (frozen), with a head probed on the source task
        tcfg = TrainConfig(**dict(settings, strategy="linear_probe", seed=seed, device=device))
        model: torch.nn.Module = build_text_model(arch, len(src_spec.classes), seed=seed, pretrained=True)
    else:
        tcfg = TrainConfig(**dict(settings, strategy="full", seed=seed, device=device))
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
        "config_hash": key,
    }
    man = _train_and_save("pretrain", model, src, tcfg, path, meta, progress, log=log)
    log(f"[finetune] pretrained base in {man['seconds']:.1f}s: source test acc {man['metrics']['test_acc']:.3f}")
    return man


def _from_shipped(skey: str, key: str, path: Path, log) -> dict | None:
    """The shipped pretrained base (:mod:`.shipped`) written as this run's base checkpoint, when it was made
    with this run's settings by the current pretraining code; None otherwise (then the base is pretrained)."""
    got = shipped_base(skey)
    if got is None:
        return None
    sd, sman = got
    man = {k: v for k, v in sman.items() if k not in ("file", "sha256", "versions", "shipped_key", "pretrain_code")}
    man.update(
        config_hash=key,
        seconds=0.0,
        shipped={
            "file": SHIPPED.name,
            "made_in_seconds": sman.get("seconds"),
            "made_with": sman.get("versions", {}),
        },
    )
    man = _save_on_main(path, sd, man)
    run_line.replan("pretrain", 0.0)  # no pretraining in this run: the progress line's ETA drops it
    log(
        f"[finetune] base: the pretrained copy shipped with tunelens (made by this pretraining stage with these "
        f"settings in {sman.get('seconds', 0):.0f}s; source test acc {man['metrics']['test_acc']:.3f}; "
        "--set pretrain.use_shipped=false pretrains it again)"
    )
    return man


def _pretrained_base(weights: str, arch: str, seed: int, code: str, path: Path, log, input_std: float) -> dict:
    """The base model from real pretrained weights (:data:`tunelens.core.pretrained.PRETRAINED`), saved as a
    tunelens checkpoint with its full head (e.g. ImageNet's 1000 classes); no training, no source data."""
    from tunelens.core.hashing import config_hash
    from tunelens.core.naming import stage_order
    from tunelens.core.pretrained import PRETRAINED, load_pretrained

    from .data import MEAN

    if weights not in PRETRAINED:
        raise ValueError(f"unknown base_weights {weights!r}; known: {', '.join(PRETRAINED)}")
    spec = PRETRAINED[weights]
    if arch != spec.arch:
        raise ValueError(f"base_weights {weights!r} fit arch {spec.arch!r}, but the configuration's arch is {arch!r}")
    if len(set(MEAN)) != 1 or MEAN[0] != 0.5:
        raise ValueError(f"base_weights {weights!r} expect inputs centred at 0.5, the data's mean is {MEAN}")
    want = spec.input_std
    if input_std != want:  # the data are scaled as the weights expect: no weight is changed to fit the data
        raise ValueError(
            f"base_weights {weights!r} expect inputs (x - 0.5) / {want}, the data are (x - 0.5) / {input_std}: "
            f"set data.std to {want}"
        )
    prov = dict(spec.provenance(), input_std=input_std)
    key = config_hash("base", arch, weights, prov, code)
    man = _cached(path, key)
    if man is not None:
        log("[finetune] base unchanged, kept")
        return man
    t0 = time.perf_counter()
    model, _ = load_pretrained(weights, input_std=input_std)
    head: Any = model.get_submodule(head_name(model))
    nc = int(head.out_features)
    meta = {
        "name": "base",
        "role": "base",
        "arch": arch,
        "num_classes": nc,
        "classes": [],
        "strategy": "pretrained",
        "data": {"name": "imagenet-1k", "description": spec.description},
        "pretrained": prov,
        "seed": seed,
        "config_hash": key,
        "stage_order": stage_order(model),
        "metrics": {"test_acc": None},
        "history": [],
        "seconds": round(time.perf_counter() - t0, 3),
        "device": "cpu",
        "world_size": runtime.world_size(),
    }
    if runtime.is_main():
        man = save_checkpoint(path, model.state_dict(), meta)
    runtime.barrier()
    if not runtime.is_main():
        _, man = load_checkpoint(path)
    assert man is not None
    log(f"[finetune] base: {spec.description}, {nc}-class head (no pretraining stage)")
    return man


def load_run_models(
    ckdir: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    """Load every checkpoint listed in ``ckdir/manifest.json`` (verified against its sha256)."""
    ckdir = Path(ckdir)
    idx_path = ckdir / "manifest.json"
    if not idx_path.exists():
        raise FileNotFoundError(f"{idx_path} not found: run `tunelens finetune` first (or `tunelens run`)")
    index = read_run_index(ckdir)
    rerun = f"rerun `tunelens finetune --out {ckdir.parent}`"
    models, mans = {}, {}
    for name, entry in index.items():
        sd, man = load_checkpoint(ckdir / entry["file"])
        if man.get("sha256") != entry.get("sha256"):
            raise CheckpointError(
                f"checkpoint {ckdir / entry['file']} is not the one the run index {idx_path} lists (a later run "
                f"replaced it and was interrupted): {rerun}"
            )
        model = build_model(man["arch"], man["num_classes"])
        model.load_state_dict(sd)
        models[name] = model.to(device).eval()
        mans[name] = man
    for name, man in mans.items():
        parent = man.get("parent")
        if not parent:
            continue
        base = mans.get(parent.get("name"))
        if base is None or base.get("sha256") != parent.get("sha256"):
            raise CheckpointError(
                f"checkpoint {name} was tuned from a different {parent.get('name')!r} (sha256 "
                f"{str(parent.get('sha256'))[:12]}) than the one in {ckdir} "
                f"({str(base.get('sha256') if base else None)[:12]}): comparing them would mix runs; {rerun}"
            )
    return models, mans


def read_run_index(ckdir: str | Path) -> dict[str, dict]:
    """The run index ``ckdir/manifest.json`` as ``{name: entry}``; CheckpointError when it is unreadable."""
    idx_path = Path(ckdir) / "manifest.json"
    if not idx_path.exists():
        raise FileNotFoundError(f"{idx_path} not found: run `tunelens finetune` first (or `tunelens run`)")
    try:
        obj = json.loads(idx_path.read_text())
        if not isinstance(obj, dict) or "checkpoints" not in obj:
            raise KeyError("no 'checkpoints' entry")
        index = obj["checkpoints"]
        if not isinstance(index, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and "sha256" in e for e in index.values()
        ):
            raise TypeError("entries without file and sha256")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"the run index {idx_path} is not valid JSON ({e}): it is damaged; "
            f"rerun `tunelens finetune --out {Path(ckdir).parent}` to rewrite it"
        ) from None
    except (KeyError, TypeError) as e:
        what = str(e).strip("'\"")
        raise CheckpointError(
            f"the run index {idx_path} is corrupt ({what}); "
            f"rerun `tunelens finetune --out {Path(ckdir).parent}` to rewrite it"
        ) from None
    return index


def make_shipped_base(cfg: dict, out_dir: Path = SHIPPED.parent) -> Path:
    """Pretrain the base of ``cfg`` (the default configuration, with ``pretrain.use_shipped`` false) from
    scratch on the CPU and write it to ``out_dir`` with its keys (:mod:`.shipped`): ``make base-weights``."""
    import shutil
    import tempfile

    from tunelens.core.hashing import code_hash

    spec = data_spec(cfg, "source")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "base.safetensors"
        code = code_hash("tunelens.finetune") + code_hash("tunelens.core")
        data = make_data(cfg, spec)
        man = _pretrain_base(
            cfg, cfg["arch"], cfg["seed"], runtime.device_name("cpu"), spec, data, code, path, True, print
        )
        man = dict(
            man,
            shipped_key=shipped_key(cfg["arch"], cfg["seed"], spec.to_dict(), cfg["pretrain"]),
            pretrain_code=pretrain_code_hash(),
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / SHIPPED.name
        shutil.copyfile(path, target)
        target.with_suffix(".json").write_text(json.dumps(man, indent=2, sort_keys=True, default=str) + "\n")
    print(f"written: {target} (sha256 {man['sha256'][:16]}, source test acc {man['metrics']['test_acc']:.3f})")
    return target
