"""Plain-language findings from result tables, each with its numbers, its uncertainty and its evidence.

Findings are generated, never written by hand: every sentence is formatted from
the tables it cites. Each carries ``evidence`` (the name of the result table it is
read from; the report links it to the figure or table that shows it), ``score`` (how much it should lead the list) and, where one is
known, ``uncertainty`` (a confidence interval or the reason there is none).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from tunelens.analysis.findings.literature import NOT_AS_EXPECTED, literature_checks, merchant_checks

__all__ = [
    "Finding",
    "modality_words",
    "paired_bootstrap_diff",
    "rank_findings",
    "transfer_findings",
    "units",
    "weight_findings",
    "word",
]

# The modality's words: the same sentences serve images and text ("test images" / "test sentences").
_WORDS = {
    "image": {
        "units": "images",
        "unit": "image",
        "region": "inside the object",
        "maps": "maps",
        "ceiling": "under a one-pixel shift or new noise",
    },
    "text": {
        "units": "sentences",
        "unit": "sentence",
        "region": "on the decisive tokens",
        "maps": "token attributions",
        "ceiling": "with every sentence shifted by one token, a neutral word put before it",
    },
}
_MODALITY: contextvars.ContextVar[str] = contextvars.ContextVar("tunelens_modality", default="image")


def word(key: str) -> str:
    """The current modality's word for ``key`` (``units``, ``unit``, ``region``, ``maps``, ``ceiling``)."""
    return _WORDS[_MODALITY.get()][key]


def units() -> str:
    """What the data is made of in the current modality: ``images`` or ``sentences``."""
    return word("units")


def _region() -> str:
    return word("region")


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
            head = stages[(stages["model"] == model) & (stages["stage"] == "head")]
            replaced = bool(len(head)) and int(head["replaced"].sum()) > 0
            moved = bool(len(head)) and float(head["relative"].fillna(0).max()) > 0
            tail = (
                "only the head was replaced and trained."
                if replaced
                else ("only the head was trained." if moved else "nothing changed: the head is identical too.")
            )
            out.append(
                Finding(
                    f"weights_frozen_{model}",
                    f"{model}: the backbone did not move at all (every shared weight is bit-identical to the "
                    f"pretrained one); {tail}",
                    "weight_stages",
                    score=3 if replaced or moved else 9,
                    uncertainty="exact (computed on the weights, no sampling)",
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


_NONFINITE = re.compile(r"(?<![A-Za-z])(nan|inf)(?![A-Za-z])", re.IGNORECASE)

#: below this many test images the report opens with a caveat: a difference of one image is 1 point at 100,
#: the two-standard-error noise of an accuracy near 80% about 11 points, and bootstrap CIs over fewer images
#: are unstable (percentile intervals need tens of distinct resamples)
MIN_TEST_IMAGES = 100


def checked(f: Finding) -> Finding:
    """``f`` with no ``nan`` or ``inf`` in its sentence or uncertainty: a number that could not be computed is
    replaced by words (the generators avoid them; this is the last guard)."""
    text = _NONFINITE.sub("n/a (not computable)", f.text)
    unc = f.uncertainty
    if unc is not None and _NONFINITE.search(unc):
        unc = "not computable from this little data: " + _NONFINITE.sub("n/a", unc)
    return Finding(f.id, text, f.evidence, f.score, unc, f.kind) if (text, unc) != (f.text, f.uncertainty) else f


def small_data_caveat(findings: list[Finding], n_test: int | None) -> list[Finding]:
    """Below :data:`MIN_TEST_IMAGES` test images: a caveat that leads the list, and every finding read from
    sampled data (all but the exact weight deltas) says so in its uncertainty."""
    if n_test is None or n_test >= MIN_TEST_IMAGES:
        return findings
    out = [
        Finding(
            "small_data",
            f"Caveat: only {n_test} test {units()} (fewer than {MIN_TEST_IMAGES}). Accuracy differences of several "
            f"points, CKA and attribution changes read from so few {units()} are within sampling noise; the findings "
            "below that depend on the data say so.",
            "accuracy",
            score=100,
            kind="caveat",
        )
    ]
    for f in findings:
        if f.evidence == "weight_stages":
            out.append(f)
            continue
        unc = f"few test {units()} ({n_test} < {MIN_TEST_IMAGES})" + (f"; {f.uncertainty}" if f.uncertainty else "")
        out.append(Finding(f.id, f.text, f.evidence, f.score, unc, f.kind))
    return out


def rank_findings(findings: list[Finding]) -> list[dict]:
    return [checked(f).to_dict() for f in sorted(findings, key=lambda f: -f.score)]


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
    exclude: Sequence[str] = ("fc",),
    n_test: int | None = None,
    cka: pd.DataFrame | None = None,
    layer_stages: dict[str, str] | None = None,
) -> list[Finding]:
    """Rewind criticality, the loss barrier, probe gains (``exclude``: layers left out, the logits), and the
    literature's three expectations. A change within its sampling noise is never called the largest."""
    out: list[Finding] = []
    if rewind is not None and len(rewind):
        r = rewind[rewind["model"] == primary]
        grp = r[~r["group"].isin(["none", "all_but_head"])]
        if len(grp):
            top = grp.loc[grp["acc_drop"].idxmax()]
            low = grp.loc[grp["acc_drop"].idxmin()]
            ref = r[r["group"] == "none"].iloc[0]
            n_ref = max(int(ref["n"]), 1)  # an accuracy of 0 or 1 has no binomial spread: read it as 1/(n+1) from it
            noise = _noise_pts(float(np.clip(ref["acc"], 1 / (n_ref + 1), n_ref / (n_ref + 1))), n_ref)
            if 100 * top["acc_drop"] > noise:
                text = (
                    f"Rewinding {top['group']} of the {primary} model to its pretrained weights costs "
                    f"{100 * top['acc_drop']:.1f} points of target accuracy, rewinding {low['group']} costs "
                    f"{100 * low['acc_drop']:.1f}: the new task lives most in {top['group']}."
                )
            elif top["acc_drop"] <= 0:
                text = (
                    f"No single stage of the {primary} model is critical: rewinding any one stage to its "
                    "pretrained weights costs no accuracy."
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
                uncertainty=f"{int(interp['n'].iloc[0])} test {units()}, {len(interp)} points along the path"
                + (f"; BatchNorm statistics: {interp['bn'].iloc[0]}" if interp["bn"].iloc[0] != "none" else ""),
            )
        )
    if gains is not None and len(gains):
        g = gains[~gains["layer"].isin(list(exclude))].dropna(subset=["gain"])
        if len(g):
            top = g.loc[g["gain"].abs().idxmax()]
            n = int(n_test) if n_test else 100
            p_ = float(np.clip((top["tuned_test_acc"] + top["base_test_acc"]) / 2, 1 / (n + 1), n / (n + 1)))
            noise = _noise_pts(p_, n)
            if abs(top["gain"]) > noise:
                verb = "rises" if top["gain"] > 0 else "falls"
                text = (
                    f"Linear-probe accuracy on the target task {verb} most at {top['layer']} after fine-tuning "
                    f"({top['gain']:+.1f} points: {pct(top['base_test_acc'])} -> {pct(top['tuned_test_acc'])})."
                )
            else:
                text = (
                    "Linear-probe accuracy on the target task changes at no layer beyond sampling noise after "
                    f"fine-tuning (largest change {top['gain']:+.1f} points, at {top['layer']}; noise about "
                    f"{noise:.0f} points)"
                    + (
                        ", and the probes are at ceiling (100%) in both models."
                        if (g["base_test_acc"] >= 1).all() and (g["tuned_test_acc"] >= 1).all()
                        else "."
                    )
                )
            out.append(
                Finding(
                    "probe_gain",
                    text,
                    "probes",
                    score=7 if abs(top["gain"]) > noise else 3,
                    uncertainty=f"one probe per layer on {n} target test {units()}; changes under about "
                    f"{noise:.0f} points are within sampling noise (2 s.e.)",
                )
            )
    # the three expectations on the first and the last stage of any network, and for transformer encoders
    # Merchant et al.'s depth profile (analysis/literature.py)
    checks = literature_checks(rewind, gains, stages, primary)
    if _MODALITY.get() == "text":
        checks += merchant_checks(stages, cka, layer_stages or {}, primary)
    if checks:
        held = sum(NOT_AS_EXPECTED not in c and "[cannot tell]" not in c for c in checks)
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
        other = c[c["pooling"] == "[CLS]"]
        c = c[c["pooling"] != "[CLS]"].reset_index(drop=True)
        if len(other):
            lo = other.loc[other["cka_base_tuned"].idxmin()]
            rnd_cls = float(lo.get("cka_base_random", float("nan")))
            extra = f" On the [CLS] token the lowest CKA is {lo['cka_base_tuned']:.2f} at {lo['layer']}" + (
                f" (random-weights baseline {rnd_cls:.2f})." if np.isfinite(rnd_cls) else "."
            )
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
    ci = f", 95% CI {low['ci_low']:.2f} to {low['ci_high']:.2f}" if has_ci else ""
    if clear:
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
            txt += f" (CI {lo:.2f} to {hi:.2f})"
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


_METHOD_NAMES = {
    "integrated_gradients": "integrated gradients",
    "feature_ablation": "feature ablation",
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


def _index_note(ci: float) -> str:
    """Words for a change index outside [0, 1] (see the attribution study's calibration)."""
    if ci > 1:
        return " (above 1: beyond the randomized network)"
    if ci < 0:
        return " (below 0: closer than the base model to itself)"
    return ""


def attribution_findings(
    summary: pd.DataFrame, localisation: pd.DataFrame | None, per_class: pd.DataFrame, primary: str
) -> list[Finding]:
    """How much the maps changed (change index with CI), where the evidence moved (mass inside the object),
    which class changed most; uninformative methods are named, not used."""
    out: list[Finding] = []
    inf = summary[summary["informative"]]
    flagged = summary[~summary["informative"]]["method"].tolist()
    for _, r in inf.dropna(subset=["change_index"]).sort_values("change_index", ascending=False).head(2).iterrows():
        name = _METHOD_NAMES.get(r["method"], r["method"])
        ci, lo, hi = r["change_index"], r["change_index_lo"], r["change_index_hi"]
        has_ci = bool(np.isfinite(lo) and np.isfinite(hi))
        if has_ci and lo <= 0 <= hi:
            how = "did not move clearly away from the base model's (the CI includes 0)"
        elif ci > 1:
            how = f"moved farther from the base model's than a randomized network's {word('maps')} do"
        elif ci < 0:
            how = f"stayed closer to the base model's than the base model to itself {word('ceiling')}"
        else:
            how = f"moved {'far' if ci > 0.5 else 'part of the way'} from the base model's"
        note = _index_note(ci)
        out.append(
            Finding(
                f"attr_change_{r['method']}",
                f"{_cap(name)} {word('maps')} of the {primary} model {how}: change index "
                f"{ci:.2f}{note} on a scale where 0 is as close as the base model to itself {word('ceiling')} "
                f"({r['ceiling']:.2f}) and 1 is as far as a randomized network ({r['floor']:.2f}).",
                "attribution_summary",
                score=7.5 if has_ci and not lo <= 0 <= hi else 4,
                uncertainty=(
                    f"95% CI {lo:.2f} to {hi:.2f} (bootstrap over {int(r['n'])} {units()}; similarity: "
                    f"{r['similarity']})"
                    if has_ci
                    else f"no CI: {int(r['n'])} {word('unit')}(s), too few to bootstrap"
                ),
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
            rest = pc.drop(index=r.name)
            has_ci = bool(np.isfinite(pc["ab_lo"]).all() and np.isfinite(pc["ab_hi"]).all())
            if has_ci and bool((r["ab_hi"] < rest["ab_lo"]).all()):
                out.append(
                    Finding(
                        "attr_class",
                        f"{_cap(_METHOD_NAMES.get(m, m))} {word('maps')} changed most for class {r['class']} "
                        f"(change index {r['change_index']:.2f}{_index_note(r['change_index'])}; base-vs-tuned "
                        f"similarity {r['ab']:.2f}).",
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
                + f" (their {word('maps')} barely change even when the "
                "network's top layers are randomized, or their ceiling and floor are too close).",
                "attribution_summary",
                score=2,
                kind="caveat",
            )
        )
    return out
