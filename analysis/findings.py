"""Plain-language findings from result tables, each with its numbers, its uncertainty and its evidence.

Findings are generated, never written by hand: every sentence is formatted from
the tables it cites. Each carries ``evidence`` (the name of the result table it is
read from; the report links it to the figure or table that shows it), ``score`` (how much it should lead the list) and, where one is
known, ``uncertainty`` (a confidence interval or the reason there is none).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = [
    "Finding",
    "modality_words",
    "paired_bootstrap_diff",
    "rank_findings",
    "transfer_findings",
    "units",
    "weight_findings",
]

# The modality's words: the same sentences serve images and text ("test images" / "test sentences").
_WORDS = {
    "image": {"units": "images", "region": "inside the object"},
    "text": {"units": "sentences", "region": "on the decisive tokens"},
}
_MODALITY: contextvars.ContextVar[str] = contextvars.ContextVar("tunelens_modality", default="image")


def units() -> str:
    """What the data is made of in the current modality: ``images`` or ``sentences``."""
    return _WORDS[_MODALITY.get()]["units"]


def _region() -> str:
    return _WORDS[_MODALITY.get()]["region"]


@contextlib.contextmanager
def modality_words(modality: str) -> Iterator[None]:
    """Findings formatted inside this block use the words of ``modality`` (``image`` or ``text``)."""
    token = _MODALITY.set(modality if modality in _WORDS else "image")
    try:
        yield
    finally:
        _MODALITY.reset(token)


@dataclass(frozen=True)
class Finding:
    id: str
    text: str
    evidence: str
    score: float = 0.0
    uncertainty: str | None = None
    kind: str = "result"  # result | caveat

    def to_dict(self) -> dict:
        return asdict(self)


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def paired_bootstrap_diff(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired samples and its percentile bootstrap CI (resampling samples)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired_bootstrap_diff needs two non-empty arrays of equal length")
    rng = np.random.default_rng(seed)
    d = a - b
    idx = rng.integers(0, len(d), (n_boot, len(d)))
    boots = d[idx].mean(1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)


def transfer_findings(predictions: pd.DataFrame, primary: str = "full", control: str = "scratch") -> list[Finding]:
    """Does pretraining beat training from scratch, and which strategy is best (paired bootstrap over test images)."""
    out = []
    models = list(dict.fromkeys(predictions["model"]))
    acc = predictions.groupby("model", sort=False)["correct"].mean()
    if primary in models and control in models:
        a = predictions[predictions.model == primary].sort_values("index")["correct"].to_numpy()
        b = predictions[predictions.model == control].sort_values("index")["correct"].to_numpy()
        d, lo, hi = paired_bootstrap_diff(a, b)
        verdict = (
            "Pretraining helped"
            if lo > 0
            else ("Pretraining hurt" if hi < 0 else "Pretraining made no clear difference")
        )
        out.append(
            Finding(
                "transfer",
                f"{verdict}: fine-tuning from the pretrained weights ({primary}) reaches "
                f"{pct(acc[primary])} target test accuracy against {pct(acc[control])} for the same network trained "
                f"from scratch with the same budget ({100 * d:+.1f} points).",
                "accuracy",
                score=10 + abs(d) * 10,
                uncertainty=f"95% CI of the difference {100 * lo:+.1f} to {100 * hi:+.1f} points "
                f"(paired bootstrap over {len(a)} test {units()})",
            )
        )
    tuned = [m for m in models if m not in (control, "base")]
    if len(tuned) > 1:
        best = max(tuned, key=lambda m: acc[m])
        worst = min(tuned, key=lambda m: acc[m])
        a = predictions[predictions.model == best].sort_values("index")["correct"].to_numpy()
        b = predictions[predictions.model == worst].sort_values("index")["correct"].to_numpy()
        d, lo, hi = paired_bootstrap_diff(a, b, seed=1)
        out.append(
            Finding(
                "best_strategy",
                f"Of the fine-tuning strategies, {best} scores best ({pct(acc[best])}) and {worst} "
                f"worst ({pct(acc[worst])}), a gap of {100 * d:.1f} points.",
                "strategies",
                score=6 + d * 5,
                uncertainty=f"95% CI {100 * lo:+.1f} to {100 * hi:+.1f} points (paired bootstrap)",
            )
        )
    return out


def weight_findings(stages: pd.DataFrame, primary: str = "full") -> list[Finding]:
    """Which stage moved most under each strategy, relative to the stem; frozen stages that stayed put."""
    out = []
    for model, g in stages.groupby("model", sort=False):
        g = g[g["stage"] != "head"].dropna(subset=["relative"])
        if g.empty:
            continue
        top = g.loc[g["relative"].idxmax()]
        if top["relative"] == 0:
            out.append(
                Finding(
                    f"weights_frozen_{model}",
                    f"{model}: the backbone did not move at all (every "
                    "shared weight is bit-identical to the pretrained one); only the new head was trained.",
                    "weight_stages",
                    score=3,
                )
            )
            continue
        low = g.loc[g["relative"].idxmin()]
        first = g.sort_values("depth").iloc[0]  # the stem for ResNets
        parts = []
        if first["stage"] != top["stage"]:
            parts.append(
                f"{top['relative'] / first['relative']:.1f}x the {first['stage']}'s {pct(first['relative'], 2)}"
                if first["relative"] > 0
                else f"while the {first['stage']} did not move"
            )
        if low["stage"] not in (top["stage"], first["stage"]):
            parts.append(f"{low['stage']} moved least ({pct(low['relative'], 2)})")
        out.append(
            Finding(
                f"weights_{model}",
                f"{model}: {top['stage']} moved most, its weights changed by "
                f"{pct(top['relative'], 2)} of their norm (relative Frobenius)"
                + (", " + "; ".join(parts) if parts else "")
                + ".",
                "weight_stages",
                score=(8 if model == primary else 4),
                uncertainty="exact (computed on the weights, no sampling)",
            )
        )
    return out


def rank_findings(findings: list[Finding]) -> list[dict]:
    return [f.to_dict() for f in sorted(findings, key=lambda f: -f.score)]


def _noise_pts(p: float, n: int) -> float:
    """Two standard errors of an accuracy difference between two evaluations on the same n images (points)."""
    return 100 * 2 * float(np.sqrt(2 * max(p * (1 - p), 1e-12) / max(n, 1)))


def functional_findings(
    rewind: pd.DataFrame | None,
    interp: pd.DataFrame | None,
    barrier: float | None,
    gains: pd.DataFrame | None,
    stages: pd.DataFrame | None,
    primary: str,
) -> list[Finding]:
    """Rewind criticality, the loss barrier, probe gains, and the literature's three expectations."""
    out: list[Finding] = []
    checks = []
    if rewind is not None and len(rewind):
        r = rewind[rewind["model"] == primary]
        grp = r[~r["group"].isin(["none", "all_but_head"])]
        if len(grp):
            top = grp.loc[grp["acc_drop"].idxmax()]
            low = grp.loc[grp["acc_drop"].idxmin()]
            ref = r[r["group"] == "none"].iloc[0]
            noise = _noise_pts(ref["acc"], int(ref["n"]))
            if 100 * top["acc_drop"] > noise:
                text = (
                    f"Rewinding {top['group']} of the {primary} model to its pretrained weights costs "
                    f"{100 * top['acc_drop']:.1f} points of target accuracy, rewinding {low['group']} costs "
                    f"{100 * low['acc_drop']:.1f}: the new task lives most in {top['group']}."
                )
            else:
                text = (
                    f"No single stage of the {primary} model is critical: rewinding any one stage to its "
                    f"pretrained weights costs at most {100 * top['acc_drop']:.1f} points ({top['group']}), "
                    "within sampling noise."
                )
            abh = r[r["group"] == "all_but_head"]
            if len(abh):
                text += f" Rewinding the whole backbone costs {100 * abh['acc_drop'].iloc[0]:.1f} points."
            out.append(
                Finding(
                    "rewind",
                    text,
                    "rewind",
                    score=9,
                    uncertainty=f"{int(ref['n'])} test {units()}; differences under about {noise:.1f} "
                    "points are within sampling noise (2 s.e.)",
                )
            )
            l1 = grp[grp["group"] == "layer1"]
            l4 = grp[grp["group"] == "layer4"]
            if len(l1) and len(l4):
                ok = l1["acc_drop"].iloc[0] < l4["acc_drop"].iloc[0]
                checks.append(
                    f"rewinding layer1 costs {'less' if ok else 'no less'} than rewinding layer4 "
                    f"({100 * l1['acc_drop'].iloc[0]:.1f} vs {100 * l4['acc_drop'].iloc[0]:.1f} points)"
                    + ("" if ok else " [not as expected]")
                )
    if interp is not None and len(interp) and barrier is not None:
        verdict = "No loss barrier" if barrier < 0.05 else "A loss barrier"
        a = interp.loc[interp["excess_loss"].idxmax(), "alpha"]
        out.append(
            Finding(
                "barrier",
                f"{verdict} between the pretrained and the fine-tuned weights ({primary}): the largest excess "
                f"loss over the straight line is {barrier:.3f} (at alpha = {a:.2f}); the two solutions "
                f"{'lie in one basin' if barrier < 0.05 else 'are separated by a ridge'}.",
                "interpolation",
                score=6,
                uncertainty=f"{int(interp['n'].iloc[0])} test {units()}, {len(interp)} points along the path; "
                f"BatchNorm statistics: {interp['bn'].iloc[0]}",
            )
        )
    if gains is not None and len(gains):
        g = gains[~gains["layer"].isin(["fc"])]
        if len(g):
            top = g.loc[g["gain"].idxmax()]
            out.append(
                Finding(
                    "probe_gain",
                    f"Linear-probe accuracy on the target task rises most at {top['layer']} after "
                    f"fine-tuning ({top['gain']:+.1f} points: {pct(top['base_test_acc'])} -> {pct(top['tuned_test_acc'])}).",
                    "probes",
                    score=7,
                    uncertainty="one probe per layer on the target test split; "
                    f"{_noise_pts(top['tuned_test_acc'], 100):.0f}-point noise scale per 100 test {units()}",
                )
            )
            last_stage = g[g["layer"].str.startswith("layer")]
            if len(last_stage):
                ls = last_stage.sort_values("depth").iloc[-1]
                l1 = g[g["layer"] == "layer1"]
                if len(l1):
                    ok = ls["gain"] > l1["gain"].iloc[0]
                    checks.append(
                        f"the probe gain is {'larger' if ok else 'not larger'} at {ls['layer']} than at "
                        f"layer1 ({ls['gain']:+.1f} vs {l1['gain'].iloc[0]:+.1f} points)"
                        + ("" if ok else " [not as expected]")
                    )
    if stages is not None and len(stages):
        s = stages[stages["model"] == primary].set_index("stage")
        if {"stem", "layer1", "layer4"} <= set(s.index):
            early = float(s.loc[["stem", "layer1"], "relative"].mean())
            late = float(s.loc["layer4", "relative"])
            ok = early < late
            checks.insert(
                0,
                f"early layers change {'least' if ok else 'not least'} (mean relative change of stem "
                f"and layer1 {pct(early, 2)} vs layer4 {pct(late, 2)})" + ("" if ok else " [not as expected]"),
            )
    if stages is not None and len(stages):
        checks[:0] = _bert_depth_checks(stages[stages["model"] == primary])
    if checks:
        held = sum("[not as expected]" not in c for c in checks)
        out.append(
            Finding(
                "literature",
                f"Transfer-learning expectations ({held} of {len(checks)} hold for "
                f"{primary}): " + "; ".join(checks) + ".",
                "rewind",
                score=5,
                kind="result" if held == len(checks) else "caveat",
            )
        )
    return out


def similarity_findings(chance: pd.DataFrame, primary: str, kept: float = 0.9) -> list[Finding]:
    """Where representations were kept (CKA >= ``kept``) and where they diverged, read against the
    random-weights baseline and, when present, the from-scratch control."""
    out: list[Finding] = []
    c = chance.dropna(subset=["cka_base_tuned"]).reset_index(drop=True)
    if c.empty:
        return out
    extra = ""
    if "pooling" in c:  # transformers: the masked mean leads; the [CLS] token is reported beside it
        other = c[c["pooling"] != c["pooling"].iloc[0]]
        c = c[c["pooling"] == c["pooling"].iloc[0]].reset_index(drop=True)
        if len(other):
            lo = other.loc[other["cka_base_tuned"].idxmin()]
            extra = (
                f" On the {lo['pooling']} token the lowest CKA is {lo['cka_base_tuned']:.2f} at {lo['layer']} "
                f"(random-weights baseline {lo.get('cka_base_random', float('nan')):.2f})."
            )
    est = c["estimator"].iloc[0] if "estimator" in c else "CKA"
    kept_layers = []
    for _, r in c.iterrows():
        if r["cka_base_tuned"] >= kept:
            kept_layers.append(r["layer"])
        else:
            break
    low = c.loc[c["cka_base_tuned"].idxmin()]
    rnd = low.get("cka_base_random", float("nan"))
    adapted = np.isfinite(rnd) and low["cka_base_tuned"] > rnd + 0.1
    head = (
        f"representations are kept through {kept_layers[-1]} (CKA >= {kept})"
        if kept_layers
        else f"no layer keeps CKA >= {kept}"
    )
    txt = (
        f"{primary}: {head}; {low['layer']} diverges most (CKA {low['cka_base_tuned']:.2f}, 95% CI "
        f"{low['ci_low']:.2f}-{low['ci_high']:.2f})"
    )
    if np.isfinite(rnd):
        txt += (
            f", {'still far above' if adapted else 'not clearly above'} the random-weights baseline "
            f"{rnd:.2f}: features were {'adapted, not replaced' if adapted else 'largely replaced'}"
        )
    sc = low.get("cka_tuned_scratch", float("nan"))
    if np.isfinite(sc):
        txt += f". The scratch control's {low['layer']} has CKA {sc:.2f} with the tuned model"
    out.append(
        Finding(
            "cka",
            txt + "." + extra,
            "cka_chance",
            score=8.5,
            uncertainty=f"estimator: {est}; CI: bootstrap over batches",
        )
    )
    return out


_METHOD_NAMES = {
    "integrated_gradients": "integrated gradients",
    "grad_cam": "Grad-CAM",
    "saliency": "saliency",
    "input_x_gradient": "input x gradient",
    "smoothgrad": "SmoothGrad",
    "gradient_shap": "GradientSHAP",
    "occlusion": "occlusion",
    "guided_backprop": "guided backprop",
}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def attribution_findings(
    summary: pd.DataFrame, localisation: pd.DataFrame | None, per_class: pd.DataFrame, primary: str
) -> list[Finding]:
    """How much the maps changed (change index with CI), where the evidence moved (mass inside the object),
    which class changed most; uninformative methods are named, not used."""
    out: list[Finding] = []
    inf = summary[summary["informative"]]
    flagged = summary[~summary["informative"]]["method"].tolist()
    for _, r in inf.sort_values("change_index", ascending=False).head(2).iterrows():
        name = _METHOD_NAMES.get(r["method"], r["method"])
        out.append(
            Finding(
                f"attr_change_{r['method']}",
                f"{_cap(name)} maps of the {primary} model moved "
                f"{'far' if r['change_index'] > 0.5 else 'part of the way'} from the base model's: change index "
                f"{r['change_index']:.2f} on a scale where 0 is as close as the base model to itself under a one-pixel "
                f"shift or new noise ({r['ceiling']:.2f}) and 1 is as far as a randomized network ({r['floor']:.2f}).",
                "attribution_summary",
                score=7.5,
                uncertainty=f"95% CI {r['change_index_lo']:.2f} to {r['change_index_hi']:.2f} (bootstrap over {int(r['n'])} "
                f"{units()}; similarity: {r['similarity']})",
            )
        )
    if localisation is not None and len(inf):
        loc = localisation[(localisation["metric"] == "mass") & localisation["method"].isin(inf["method"])]
        if len(loc):
            r = loc.loc[loc["delta"].abs().idxmax()]
            name = _METHOD_NAMES.get(r["method"], r["method"])
            rose = "rose" if r["delta"] > 0 else "fell"
            sig = r["delta_lo"] > 0 or r["delta_hi"] < 0
            out.append(
                Finding(
                    "attr_localisation",
                    f"After fine-tuning, the share of positive {name} attribution {_region()} "
                    f"{rose} from {pct(r['base'])} to {pct(r['tuned'])}"
                    + ("" if sig else " (not distinguishable from no change)")
                    + ".",
                    "attribution_localisation",
                    score=8 if sig else 4,
                    uncertainty=f"95% CI of the change {100 * r['delta_lo']:+.1f} to {100 * r['delta_hi']:+.1f} points "
                    f"(paired bootstrap over {int(r['n'])} {units()})",
                )
            )
    if len(inf) and per_class is not None and len(per_class):
        m = inf.sort_values("change_index", ascending=False)["method"].iloc[0]
        pc = per_class[per_class["method"] == m].dropna(subset=["change_index"])
        if len(pc) > 1:
            r = pc.loc[pc["change_index"].idxmax()]
            out.append(
                Finding(
                    "attr_class",
                    f"{_cap(_METHOD_NAMES.get(m, m))} maps changed most for class {r['class']} "
                    f"(change index {r['change_index']:.2f}; base-vs-tuned similarity {r['ab']:.2f}).",
                    "attribution_per_class",
                    score=4,
                    uncertainty=f"similarity 95% CI {r['ab_lo']:.2f}-{r['ab_hi']:.2f} over {int(r['n'])} {units()}",
                )
            )
    if flagged:
        out.append(
            Finding(
                "attr_flagged",
                "Uninformative for comparing these two models, so left out of the findings: "
                + ", ".join(_METHOD_NAMES.get(f, f) for f in flagged)
                + " (their maps barely change even when the "
                "network's top layers are randomized, or their ceiling and floor are too close).",
                "attribution_summary",
                score=2,
                kind="caveat",
            )
        )
    return out


def _bert_depth_checks(stages: pd.DataFrame) -> list[str]:
    """Merchant et al. 2020 ("What Happens To BERT Embeddings During Fine-tuning?"): fine-tuning changes the
    top layers most and the lower layers least. Checked on the relative weight change per encoder layer:
    the mean of the lower third (embeddings and the first layers) against the top third, and the Spearman
    correlation of relative change with depth."""
    layers = stages[stages["stage"].str.startswith("encoder.layer.")].copy()
    if len(layers) < 3:
        return []
    layers["k"] = layers["stage"].str.rsplit(".", n=1).str[-1].astype(int)
    layers = layers.sort_values("k")
    third = max(len(layers) // 3, 1)
    low, top = layers.iloc[:third], layers.iloc[-third:]
    lo, hi = float(low["relative"].mean()), float(top["relative"].mean())
    ok = lo < hi
    from scipy.stats import spearmanr

    rho = float(spearmanr(layers["k"], layers["relative"]).statistic)
    out = [
        f"lower encoder layers change least and the top layers most, as Merchant et al. (2020) report for "
        f"fine-tuned BERT: {'yes' if ok else 'no'} (mean relative change of layers "
        f"{', '.join(map(str, low['k']))} {pct(lo, 3)} vs layers {', '.join(map(str, top['k']))} {pct(hi, 3)}; "
        f"Spearman correlation of change with depth {rho:+.2f})" + ("" if ok else " [not as expected]")
    ]
    emb = stages[stages["stage"] == "embeddings"]
    if len(emb):
        e = float(emb["relative"].iloc[0])
        ok = e < hi
        out.append(
            f"the embeddings change less than the top layers ({pct(e, 3)} vs {pct(hi, 3)})"
            + ("" if ok else " [not as expected]")
        )
    return out
