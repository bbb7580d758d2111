"""The analyze stage: every analysis of the library over one base model and its tuned models.

``analyze_models`` takes models and data (not files), so it serves the default run
and users' own checkpoints alike, and returns a :class:`~analysis.results.Results`
(tables + arrays + summary with ranked findings). Each analysis is optional and a
skipped one says why in ``summary["skipped"]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tunelens.core.evaluation import unpack_batch
from tunelens.core.results import Results

from . import findings as F
from .layers import resolve_layers
from .sharding import batch_offsets, gather_rows, per_sample_batch_size, shard_loader
from .weights import aggregate_deltas, first_conv_filters, weight_deltas

__all__ = ["analyze_models", "predictions_table", "training_tables"]


@torch.no_grad()
def predictions_table(models: dict[str, nn.Module], loader: DataLoader, device: torch.device) -> pd.DataFrame:
    """Per model and test image: label, prediction, correctness and the loss (for paired comparisons).

    Under ``torch.distributed`` with a :func:`analysis.sharding.shard_loader` loader each rank predicts its
    batches and the rows of all ranks are gathered (a collective), in single-process order."""
    frames = []
    offsets = batch_offsets(loader)
    for name, model in models.items():
        model.eval()
        rows = []
        idx = 0
        for b, batch in enumerate(loader):
            if offsets is not None:
                idx = offsets[b]
            x, y, _ = unpack_batch(batch)
            out = model(x.to(device, non_blocking=True)).float()
            loss = torch.nn.functional.cross_entropy(out, y.to(device, non_blocking=True), reduction="none").cpu()
            pred = out.argmax(1).cpu()
            for i in range(len(y)):
                rows.append(
                    {
                        "model": name,
                        "index": idx,
                        "label": int(y[i]),
                        "pred": int(pred[i]),
                        "correct": int(pred[i] == y[i]),
                        "loss": float(loss[i]),
                    }
                )
                idx += 1
        frames.append(gather_rows(rows, sort_by="index"))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def training_tables(manifests: dict[str, dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training curves (per model, epoch) and per-stage gradient norm / update ratio (long format)."""
    curves, stages = [], []
    for name, man in manifests.items():
        order = man.get("stage_order", [])
        for rec in man.get("history", []):
            curves.append({"model": name, **{k: v for k, v in rec.items() if not isinstance(v, dict)}})
            for s, g in rec.get("grad_norm", {}).items():
                stages.append(
                    {
                        "model": name,
                        "epoch": rec["epoch"],
                        "stage": s,
                        "depth": order.index(s) if s in order else len(order),
                        "grad_norm": g,
                        "update_ratio": rec.get("update_ratio", {}).get(s),
                    }
                )
    st = pd.DataFrame(stages)
    if len(st):
        st = st.sort_values(["model", "epoch", "depth"], kind="stable").reset_index(drop=True)
    return pd.DataFrame(curves), st


def _random_like(base: nn.Module, manifest: dict, seed: int) -> nn.Module:
    """The base architecture with fresh random weights (its own initialisation when tunelens can build it)."""
    from tunelens.finetune.models import build_model

    from .similarity import randomly_initialised

    try:
        m = build_model(manifest["arch"], int(manifest["num_classes"]), seed=seed)
        if set(m.state_dict()) == set(base.state_dict()):
            return m
    except Exception:
        pass
    return randomly_initialised(base, seed=seed)


def _backbone_layers(base: nn.Module, tuned: nn.Module) -> list[str]:
    """``auto`` layers, without the head when the two heads have different shapes."""
    from tunelens.core.naming import head_name

    layers = resolve_layers(base, "auto")
    hb, ht = head_name(base), head_name(tuned)
    wb = base.get_submodule(hb).weight.shape if hasattr(base.get_submodule(hb), "weight") else None
    wt = tuned.get_submodule(ht).weight.shape if hasattr(tuned.get_submodule(ht), "weight") else None
    if wb != wt:
        layers = [n for n in layers if n != hb and not n.startswith(hb + ".")]
    return layers


def _similarity(res: Results, models, manifests, tuned_names, primary, loader, cfg, device, findings) -> None:
    from .similarity import cka_against_chance, cka_matrix

    base = models["base"]
    seed = cfg.get("seed", 0)
    layers = _backbone_layers(base, models[primary])
    if layers != resolve_layers(base, "auto"):
        res.summary.setdefault("notes", []).append(
            "The base and tuned heads differ in shape, so CKA compares the backbones (up to the pooled features); "
            "the logits layer is left out."
        )
    diag = []
    for name in tuned_names:
        r = cka_matrix(
            base,
            models[name],
            loader,
            layers,
            layers,
            device=device,
            seed=seed,
            labels=("base", name),
            n_examples=4 if name == primary else 0,
        )
        d = r.diagonal.copy()
        d.insert(0, "model", name)
        d.insert(1, "layer", d["layer_a"])
        diag.append(d)
        if name == primary:
            res.tables["cka_base_tuned"] = r.ab.reset_index(names="layer")
            res.tables["cka_base_base"] = r.aa.reset_index(names="layer")
            res.tables["cka_tuned_tuned"] = r.bb.reset_index(names="layer")
            res.tables["activations"] = r.activations
            res.summary["cka"] = {
                "estimator": r.estimator,
                "n_samples": r.n_samples,
                "skipped_samples": r.skipped_samples,
                "primary": name,
            }
            maps = {}
            for layer in ("layer1", "layer4"):
                if layer in r.maps_a.maps and layer in r.maps_b.maps:
                    ch_a, ma = r.maps_a.strongest(layer, 4)
                    _ch_b, mb = r.maps_b.strongest(layer, 4, reference=r.maps_a)
                    maps.update({f"{layer}_base": ma, f"{layer}_tuned": mb, f"{layer}_channels": ch_a})
            if maps and r.maps_a.images is not None:
                maps["images"] = r.maps_a.images
                res.arrays["feature_maps"] = maps
    res.tables["cka_diagonal"] = pd.concat(diag, ignore_index=True)
    chance = cka_against_chance(
        base,
        models[primary],
        loader,
        layers=layers,
        random_model=_random_like(base, manifests["base"], seed + 7),
        scratch=models.get("scratch"),
        device=device,
        seed=seed,
    )
    chance.insert(0, "model", primary)
    res.tables["cka_chance"] = chance
    findings += F.similarity_findings(chance, primary)


def _attribution(res: Results, models, primary, data, cfg, device, findings, progress) -> None:
    from .attribution_study import attribution_study

    acfg = cfg["analysis"]
    classes = getattr(data["test"], "classes", None)
    study = attribution_study(
        models["base"],
        models[primary],
        data["test"],
        n_images=acfg["attribution_images"],
        seed=cfg.get("seed", 0),
        device=device,
        probe_data=data.get("train"),
        classes=list(classes) if classes is not None else None,
        progress=progress,
    )
    res.tables["attribution_summary"] = study.summary
    res.tables["attribution_comparisons"] = study.comparisons
    res.tables["attribution_per_class"] = study.per_class
    if study.localisation is not None:
        res.tables["attribution_localisation"] = study.localisation
    elif study.localisation_note:
        res.summary["skipped"]["localisation"] = study.localisation_note
    if study.faithfulness is not None:
        res.tables["attribution_faithfulness"] = study.faithfulness
    for method, ex in study.examples.items():
        arr = {
            "inputs": ex.inputs,
            "base": ex.base,
            "tuned": ex.tuned,
            "labels": ex.labels,
            "base_pred": ex.base_pred,
            "tuned_pred": ex.tuned_pred,
            "similarity": ex.similarity,
            "kinds": np.array(ex.kinds, dtype="U32"),
        }
        if ex.masks is not None:
            arr["masks"] = ex.masks
        res.arrays[f"attribution_examples_{method}"] = arr
    res.summary["attribution"] = {
        "settings": study.settings,
        "timings": study.timings,
        "notes": study.notes,
        "primary": primary,
        "classes": study.classes,
    }
    res.summary.setdefault("notes", []).extend(study.notes)
    findings += F.attribution_findings(study.summary, study.localisation, study.per_class, primary)


def _functional(res: Results, models, tuned_names, primary, data, acfg, device, findings) -> None:
    from .functional import interpolate, rewind
    from .probes import probe_gain, probe_layers

    base = models["base"]
    # each rank its block of the batches (smaller batches when there are fewer than ranks: per-sample results)
    test_loader = shard_loader(data["test"], per_sample_batch_size(len(data["test"]), 256), device=device)
    train_loader = shard_loader(data["train"], per_sample_batch_size(len(data["train"]), 64), device=device)
    # BatchNorm re-estimation along the interpolation: every rank the same first batches, as one process
    bn_loader = DataLoader(data["train"], batch_size=64, shuffle=False)
    rws = []
    for name in tuned_names:
        r = rewind(base, models[name], test_loader, device=device)
        r.insert(0, "model", name)
        rws.append(r)
    res.tables["rewind"] = pd.concat(rws, ignore_index=True)
    it = interpolate(
        base,
        models[primary],
        test_loader,
        steps=acfg.get("interpolation_steps", 11),
        train_loader=bn_loader,
        device=device,
    )
    it.insert(0, "model", primary)
    res.tables["interpolation"] = it
    res.summary["interpolation"] = {k: v for k, v in it.attrs.items()}
    probes = [
        probe_layers(models[n], train_loader, test_loader, name=n, device=device)
        for n in ["base", primary] + (["scratch"] if "scratch" in models else [])
    ]
    res.tables["probes"] = pd.concat(probes, ignore_index=True)
    gains = probe_gain(probes[0], probes[1])
    res.tables["probe_gain"] = gains
    findings += F.functional_findings(
        res.tables["rewind"], it, it.attrs.get("barrier"), gains, res.tables.get("weight_stages"), primary
    )


def strategies_table(res: Results, manifests: dict[str, dict]) -> pd.DataFrame:
    """One row per fine-tuned model (and the scratch control): accuracy, how far each stage moved, time."""
    acc = res.tables["accuracy"].set_index("model")
    rows = []
    st = res.tables.get("weight_stages")
    cka = res.tables.get("cka_diagonal")
    for name in acc.index:
        row = {
            "model": name,
            "strategy": acc.loc[name, "strategy"],
            "test_acc": acc.loc[name, "acc"],
            "train_seconds": acc.loc[name, "train_seconds"],
        }
        if st is not None:
            for _, r in st[st["model"] == name].iterrows():
                if r["stage"] != "head":
                    row[f"rel_change_{r['stage']}"] = r["relative"]
        if cka is not None and "model" in cka:
            for _, r in cka[cka["model"] == name].iterrows():
                row[f"cka_{r['layer']}"] = r["cka"]
        rows.append(row)
    return pd.DataFrame(rows)


def analyze_models(
    models: dict[str, nn.Module],
    manifests: dict[str, dict],
    data: dict[str, Dataset],
    cfg: dict[str, Any],
    device: torch.device,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Results:
    """Run the analyses. ``models`` holds ``base``, the tuned models and optionally ``scratch``;
    ``data`` holds the target task's ``train`` and ``test`` splits (items ``(x, y[, mask])``)."""
    acfg = cfg["analysis"]
    res = Results()
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}
    findings: list[F.Finding] = []
    base = models["base"]
    tuned_names = [n for n, m in manifests.items() if m.get("role") == "tuned"]
    primary = acfg.get("primary", "full")
    if primary not in tuned_names:
        primary = tuned_names[0]
    test_loader = shard_loader(data["test"], acfg["batch_size"], device=device)

    sample = [data["test"][i] for i in range(min(8, len(data["test"])))]
    res.arrays["samples"] = {
        "images": torch.stack([b[0] for b in sample]).numpy(),
        "labels": torch.as_tensor([int(b[1]) for b in sample]).numpy(),
    }
    if sample and len(sample[0]) > 2:
        res.arrays["samples"]["masks"] = torch.stack([torch.as_tensor(b[2]) for b in sample]).numpy()

    t = time.perf_counter()
    preds = predictions_table({n: m for n, m in models.items() if n != "base"}, test_loader, device)
    res.tables["predictions"] = preds
    acc = (
        preds.groupby("model", sort=False)
        .agg(acc=("correct", "mean"), loss=("loss", "mean"), n=("correct", "size"))
        .reset_index()
    )
    acc["role"] = acc["model"].map(lambda n: manifests[n].get("role"))
    acc["strategy"] = acc["model"].map(lambda n: manifests[n].get("strategy"))
    acc["train_seconds"] = acc["model"].map(lambda n: manifests[n].get("seconds"))
    res.tables["accuracy"] = acc
    curves, stages = training_tables(manifests)
    res.tables["training"], res.tables["training_stages"] = curves, stages
    findings += F.transfer_findings(preds, primary=primary)
    timings["evaluation"] = time.perf_counter() - t

    t = time.perf_counter()
    deltas, stage_tables = [], []
    for name in tuned_names:
        d = weight_deltas(base, models[name])
        d.insert(0, "model", name)
        deltas.append(d)
        s = aggregate_deltas(d)
        s.insert(0, "model", name)
        stage_tables.append(s)
    res.tables["weight_deltas"] = pd.concat(deltas, ignore_index=True)
    res.tables["weight_stages"] = pd.concat(stage_tables, ignore_index=True)
    filt = first_conv_filters(base, models[primary])
    if filt is not None:
        res.arrays["first_conv"] = {k: v for k, v in filt.items() if k != "name"}
        res.summary["first_conv_name"] = filt["name"]
    findings += F.weight_findings(res.tables["weight_stages"], primary=primary)
    timings["weights"] = time.perf_counter() - t

    res.summary["skipped"] = skipped
    stages = (
        ("cka", lambda: _similarity(res, models, manifests, tuned_names, primary, test_loader, cfg, device, findings)),
        ("attribution", lambda: _attribution(res, models, primary, data, cfg, device, findings, progress)),
        ("functional", lambda: _functional(res, models, tuned_names, primary, data, acfg, device, findings)),
    )
    for name, run in stages:
        if not acfg.get(name, True):
            skipped[name] = f"disabled in the configuration (analysis.{name} = false)"
            continue
        t = time.perf_counter()
        run()
        timings[name] = time.perf_counter() - t

    res.tables["strategies"] = strategies_table(res, manifests)

    res.summary.update(
        primary=primary, tuned=tuned_names, timings=timings, skipped=skipped, findings=F.rank_findings(findings)
    )
    return res
