"""CKA between the base and every tuned model (all layer pairs for the primary model), read against a
random-weights baseline and the from-scratch control; activation statistics and example feature maps."""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

from tunelens.analysis import findings as F
from tunelens.analysis.engine.registry import Analysis, Context, Output, register
from tunelens.analysis.findings import Finding, span
from tunelens.analysis.measures.cka_models import cka_chance_from_passes, cka_from_passes, randomly_initialised
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
    return similarity_findings(chance, res.summary.get("primary", "full"))


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


# ---- findings: this analysis's sentences, formatted from its tables


def chance_corrected(cka: float, chance: float) -> float:
    """``(CKA - chance) / (1 - chance)``: 1 as similar as identical, 0 as similar as random weights; NaN when
    the chance level is not below 1."""
    if not (np.isfinite(cka) and np.isfinite(chance)) or chance >= 1:
        return float("nan")
    return (cka - chance) / (1 - chance)


def _verdict(x: float) -> str:
    return "kept" if x >= 0.8 else ("adapted" if x >= 0.2 else "replaced")


#: a random-weights baseline above this leaves too little room: the test cannot tell kept from replaced
CHANCE_TOO_HIGH = 0.95


#: base-tuned CKA at or above this at every layer reads as "unchanged"
UNCHANGED = 0.99


#: a break between consecutive layers must drop CKA by at least this much (besides CIs that do not overlap)
BREAK_MIN_DROP = 0.3

#: base-tuned CKA below this at every layer (CI upper bounds too, where there are CIs) reads as "low at every layer"
ALL_LOW = 0.2


def cka_break(c: pd.DataFrame) -> int | None:
    """The row ``i`` (in depth order) after which base-vs-tuned CKA collapses, or None.

    A break between rows ``i`` and ``i + 1`` needs CIs and: (1) a sharp drop: ``ci_high[i+1] < ci_low[i]`` (the CIs
    do not overlap) and ``cka[i] - cka[i+1] >= BREAK_MIN_DROP``; (2) staying low: every later row ``j > i + 1`` has
    ``cka[j] <= ci_high[i+1]`` (at or below the noise of the value right after the drop) and
    ``ci_high[j] < ci_low[i]`` (clearly below the layer before it); at least one layer lies above ``i + 1`` (a drop at the last layer is that
    layer diverging most). Of several breaks the largest drop is named."""
    cka, lo, hi = (c[k].to_numpy(float) for k in ("cka_base_tuned", "ci_low", "ci_high"))
    if len(cka) < 2 or not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return None
    best, drop = None, 0.0
    for i in range(len(cka) - 2):  # a drop at the last layer is that layer diverging most, not a collapse
        d = cka[i] - cka[i + 1]
        sharp = hi[i + 1] < lo[i] and d >= BREAK_MIN_DROP
        stays = all(cka[j] <= hi[i + 1] and hi[j] < lo[i] for j in range(i + 2, len(cka)))
        if sharp and stays and d > drop:
            best, drop = i, d
    return best


def _break_text(c: pd.DataFrame, i: int) -> str:
    """``CKA falls from A at X to B at Y and stays at C above: the top layers were reorganised``."""
    a, b, above = c.iloc[i], c.iloc[i + 1], c.iloc[i + 2 :]
    txt = (
        f"base-vs-tuned CKA falls from {a['cka_base_tuned']:.2f} at {a['layer']} "
        f"(95% CI {span(a['ci_low'], a['ci_high'])}) to {b['cka_base_tuned']:.2f} at {b['layer']} "
        f"({span(b['ci_low'], b['ci_high'])})"
    )
    lo_, hi_ = above["cka_base_tuned"].min(), above["cka_base_tuned"].max()
    level = f"{lo_:.2f}" if f"{lo_:.2f}" == f"{hi_:.2f}" else span(lo_, hi_)
    names = above["layer"].iloc[0] if len(above) == 1 else f"{above['layer'].iloc[0]} to {above['layer'].iloc[-1]}"
    return txt + f" and stays at {level} above ({names}): the top layers were reorganised"


def similarity_findings(chance: pd.DataFrame, primary: str, kept: float = 0.9) -> list[Finding]:
    """Per layer the chance-corrected CKA ``(CKA - chance) / (1 - chance)`` with its CI, read as kept (>= 0.8),
    adapted (0.2-0.8) or replaced (< 0.2) only where the CI stays in one class; a layer "diverges most" only
    when its CI lies below every other layer's; a baseline near 1 or a missing CI is said, never printed."""
    out: list[Finding] = []
    c = chance.dropna(subset=["cka_base_tuned"]).reset_index(drop=True)
    if c.empty:
        return out
    extra = ""
    if "pooling" in c:  # text: the masked mean (what the head reads) leads; the [CLS] token is reported beside it
        other = c[c["pooling"] == "[CLS]"].reset_index(drop=True)
        c = c[c["pooling"] != "[CLS]"].reset_index(drop=True)
        if len(other):
            lo = other.loc[other["cka_base_tuned"].idxmin()]
            rnd_cls = float(lo.get("cka_base_random", float("nan")))
            brk_cls = cka_break(other) if {"ci_low", "ci_high"} <= set(other) else None
            extra = (
                f" On the [CLS] token {_break_text(other, brk_cls)}; its lowest CKA is {lo['cka_base_tuned']:.2f} "
                f"at {lo['layer']}"
                if brk_cls is not None
                else f" On the [CLS] token the lowest CKA is {lo['cka_base_tuned']:.2f} at {lo['layer']}"
            ) + (f" (random-weights baseline {rnd_cls:.2f})." if np.isfinite(rnd_cls) else ".")
        if c.empty:
            return out
    est = c["estimator"].iloc[0] if "estimator" in c else "CKA"
    has_ci = bool(np.isfinite(c["ci_low"]).all() and np.isfinite(c["ci_high"]).all())
    unc = f"estimator: {est}; " + (
        "CI: bootstrap over batches" if has_ci else "no CI: too few batches to bootstrap (one batch)"
    )
    if (c["cka_base_tuned"] >= UNCHANGED).all():
        out.append(
            Finding(
                "cka",
                f"{primary}: representations are unchanged at every compared layer (base-vs-tuned CKA >= {UNCHANGED} "
                f"from {c['layer'].iloc[0]} to {c['layer'].iloc[-1]}); no layer diverges.",
                "cka_chance",
                score=8.5,
                uncertainty=unc,
            )
        )
        return out
    low = c.loc[c["cka_base_tuned"].idxmin()]
    others = c.drop(index=low.name)
    clear = has_ci and len(others) and bool((low["ci_high"] < others["ci_low"]).all())
    ci = f", 95% CI {span(low['ci_low'], low['ci_high'])}" if has_ci else ""
    brk = cka_break(c)
    all_low = bool((c["cka_base_tuned"] < ALL_LOW).all()) and (not has_ci or bool((c["ci_high"] < ALL_LOW).all()))
    if brk is not None:
        txt = f"{primary}: {_break_text(c, brk)}; the lowest is {low['cka_base_tuned']:.2f} at {low['layer']}"
    elif all_low and len(c) > 1:
        rng = f"{c['cka_base_tuned'].min():.2f} to {c['cka_base_tuned'].max():.2f}"
        txt = (
            f"{primary}: base-vs-tuned CKA is low at every compared layer ({rng} from {c['layer'].iloc[0]} to "
            f"{c['layer'].iloc[-1]}, all below {ALL_LOW}{'' if has_ci else ' without CIs'}): no single layer "
            f"breaks away; the lowest is {low['layer']} ({low['cka_base_tuned']:.2f}{ci})"
        )
    elif clear:
        txt = f"{primary}: {low['layer']} diverges most (CKA {low['cka_base_tuned']:.2f}{ci})"
    else:
        txt = (
            f"{primary}: the lowest base-vs-tuned CKA is at {low['layer']} ({low['cka_base_tuned']:.2f}{ci}), "
            "not clearly below the other layers"
        )
    rnd = float(low.get("cka_base_random", float("nan")))
    if not np.isfinite(rnd):
        txt += "; without a random-weights baseline the test cannot say whether its features were kept or replaced"
    elif rnd >= CHANCE_TOO_HIGH:
        txt += (
            f"; the random-weights baseline is itself {rnd:.2f}, so the test cannot tell kept features from replaced "
            "ones here"
        )
    else:
        s_ = chance_corrected(low["cka_base_tuned"], rnd)
        txt += f"; chance-corrected {s_:.2f}" + (" (below 0: less alike than random weights)" if s_ < 0 else "")
        txt += f" against the random-weights baseline {rnd:.2f}"
        if has_ci:
            lo, hi = chance_corrected(low["ci_low"], rnd), chance_corrected(low["ci_high"], rnd)
            txt += f" (CI {span(lo, hi)})"
            txt += (
                f": features were {_verdict(s_)}"
                if _verdict(lo) == _verdict(hi)
                else f": between {_verdict(lo)} and {_verdict(hi)}, the data cannot say which"
            )
        else:
            txt += f": features look {_verdict(s_)} (no CI to confirm it)"
    sc = low.get("cka_tuned_scratch", float("nan"))
    if np.isfinite(sc):
        txt += f". The scratch control's {low['layer']} has CKA {sc:.2f} with the tuned model"
    out.append(Finding("cka", txt + "." + extra, "cka_chance", score=8.5, uncertainty=unc))
    return out
