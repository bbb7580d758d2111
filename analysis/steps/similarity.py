"""CKA between the base and every tuned model (all layer pairs for the primary model), read against a
random-weights baseline and the from-scratch control; activation statistics and example feature maps."""

from __future__ import annotations

import pandas as pd
from torch import nn

from tunelens.analysis import findings as F
from tunelens.analysis.engine.registry import Analysis, Context, Output, register
from tunelens.analysis.measures.similarity import cka_chance_from_passes, cka_from_passes, randomly_initialised
from tunelens.core.naming import head_name
from tunelens.core.results import Results
from tunelens.core.stages import StageMap, stages
from tunelens.core.text import is_text_model, readout_pooling

CKA_BASE_TUNED = "cka_base_tuned"
CKA_BASE_BASE = "cka_base_base"
CKA_TUNED_TUNED = "cka_tuned_tuned"
CKA_DIAGONAL = "cka_diagonal"
CKA_CHANCE = "cka_chance"
ACTIVATIONS = "activations"
FEATURE_MAPS = "feature_maps"  # array: strongest channels of two stages, both models


def _head_shape(model: nn.Module) -> tuple[int, ...] | None:
    w = getattr(model.get_submodule(head_name(model)), "weight", None)
    return tuple(w.shape) if w is not None else None


def backbone_layers(base: nn.Module, tuned: nn.Module, stage_map: StageMap | None = None) -> list[str]:
    """One output per stage (:meth:`tunelens.core.stages.StageMap.cka_layers`), without the logits when the
    two heads have different shapes."""
    smap = stage_map or stages(base)
    return smap.cka_layers(logits=_head_shape(base) == _head_shape(tuned))


def run(ctx: Context) -> Output:
    base, primary = ctx.base, ctx.primary
    layers = backbone_layers(base, ctx.models[primary], ctx.stage_map)
    notes: tuple[str, ...] = ()
    if layers != ctx.stage_map.cka_layers():
        notes = (
            "The base and tuned heads differ in shape, so CKA compares the backbones (up to the pooled features); "
            "the logits layer is left out.",
        )
    if is_text_model(base):
        notes += (
            "Transformer layers are compared on the attention-masked mean of their tokens (masked_mean.*) and on "
            "the [CLS] token (cls.*); padding never enters a Gram matrix.",
        )
    elif any(n.endswith(("[cls]", "[patch_mean]", "[mean]")) or "[patch_mean:" in n for n in layers):
        notes += (
            "Token stages (transformer blocks) are compared twice: on the class token ([cls]) and on the mean "
            "patch token ([patch_mean]; [mean]: the mean of every token when the model has no class token).",
        )
    tables: dict[str, pd.DataFrame] = {}
    arrays: dict = {}
    summary: dict = {}
    diag = []
    base_pass = ctx.passes.get(base)
    for name in ctx.tuned:
        r = cka_from_passes(base_pass, ctx.passes.get(ctx.models[name]), layers, seed=ctx.seed, names=("base", name))
        d = r.diagonal.copy()
        d.insert(0, "model", name)
        d.insert(1, "layer", d["layer_a"])
        diag.append(d)
        if name != primary:
            continue
        tables[CKA_BASE_TUNED] = r.ab.reset_index(names="layer")
        tables[CKA_BASE_BASE] = r.aa.reset_index(names="layer")
        tables[CKA_TUNED_TUNED] = r.bb.reset_index(names="layer")
        tables[ACTIVATIONS] = r.activations
        summary["cka"] = {
            "estimator": r.estimator,
            "n_samples": r.n_samples,
            "skipped_samples": r.skipped_samples,
            "primary": name,
        }
        maps = {}
        stages = [n for n in layers if n in r.maps_a.maps and n in r.maps_b.maps]
        if {"layer1", "layer4"} <= set(stages):  # ResNets: an early and the last stage
            pick = ["layer1", "layer4"]
        else:
            pick = [stages[1], stages[-1]] if len(stages) > 2 else stages
        for layer in pick:
            ch_a, ma = r.maps_a.strongest(layer, 4)
            _, mb = r.maps_b.strongest(layer, 4, reference=r.maps_a)
            maps.update({f"{layer}_base": ma, f"{layer}_tuned": mb, f"{layer}_channels": ch_a})
        if maps and r.maps_a.images is not None:
            maps["images"] = r.maps_a.images
            arrays[FEATURE_MAPS] = maps
    tables[CKA_DIAGONAL] = pd.concat(diag, ignore_index=True)
    rand = ctx.random_like(ctx.seed + 7) if ctx.random_like is not None else None
    if rand is None or set(rand.state_dict()) != set(base.state_dict()):
        rand = randomly_initialised(base, seed=ctx.seed + 7)
    scratch = ctx.models.get("scratch")
    chance = cka_chance_from_passes(
        base_pass,
        ctx.passes.get(ctx.models[primary]),
        ctx.passes.get(rand, keep=False),
        ctx.passes.get(scratch) if scratch is not None else None,
        layers,
        seed=ctx.seed,
    )
    chance.insert(0, "model", primary)
    if is_text_model(base):  # the text readouts: the attention-masked mean of the tokens and the [CLS] token
        chance.insert(1, "pooling", [readout_pooling(str(n)) for n in chance["layer"]])
    tables[CKA_CHANCE] = chance
    return Output(tables=tables, arrays=arrays, summary=summary, notes=notes)


def findings(res: Results) -> list[F.Finding]:
    chance = res.table(CKA_CHANCE)
    if chance is None or chance.empty:
        return []
    return F.similarity_findings(chance, res.summary.get("primary", "full"))


ANALYSIS = register(
    Analysis(
        name="cka",
        title="Representations (CKA)",
        order=20,
        tables=(CKA_BASE_TUNED, CKA_BASE_BASE, CKA_TUNED_TUNED, CKA_DIAGONAL, CKA_CHANCE, ACTIVATIONS),
        run=run,
        findings=findings,
    )
)
