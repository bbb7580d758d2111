"""Every attribution method, declared once: its Captum class, its options, what it costs, its name in the
report and the kinds of model it applies to.

The other modules read this table: :mod:`.attribute` (which methods exist, default options), :mod:`.study`
(the study's options, the random draws), :mod:`tunelens.analysis.engine.budget` (passes per map, cheaper
settings, which methods are dropped first), the attribution step (the default selection, the report's
names) and :mod:`.text` (the methods for text models).

Costs are counted in passes per map (:func:`tunelens.analysis.engine.budget.attribution_cost`): ``backward``
one forward + backward pass; ``backward x OPTION`` that many (Integrated Gradients' ``n_steps``, SmoothGrad's
``nt_samples``, GradientSHAP's ``n_samples``); ``forward per window`` one forward pass per occlusion window
position, plus one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tunelens.core.stages import StageMap

__all__ = [
    "ALL",
    "DEFAULT_METHODS",
    "DEFAULT_OPTIONS",
    "DISPLAY_NAMES",
    "DROP_ORDER",
    "FAITHFUL",
    "GRADIENT_METHODS",
    "METHODS",
    "STOCHASTIC_METHODS",
    "STUDY_OPTIONS",
    "TEXT_METHODS",
    "AttributionMethod",
    "choose_methods",
    "method_spec_problem",
]


def _frozen(d: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class AttributionMethod:
    """One attribution method and everything the suite needs to know about it."""

    name: str  # the key in settings, tables and arrays
    display: str  # in the report's sentences
    captum: str  # the Captum class (``captum.attr``)
    reference: str
    modalities: tuple[str, ...] = ("image",)
    default: bool = False  # run by default (``analysis.attribution_methods = default``)
    options: Mapping[str, Any] = field(default_factory=_frozen)  # defaults of :func:`.attribute.attribute`
    study_options: Mapping[str, Any] = field(default_factory=_frozen)  # the study's, on top of ``options``
    stochastic: bool = False  # random draws (noise, baselines): its ceiling is a new seed, not a shifted image
    reads_gradient: bool = False  # a function of the plain input gradient (one backward pass may serve several)
    faithful: bool = False  # scored by the deletion / insertion games by default
    cost: str = "backward"  # "backward", "backward x OPTION" or "forward per window"
    cost_default: int = 1  # OPTION's value when the options do not set it (the budget's prediction)
    cheaper: Mapping[str, Any] = field(default_factory=_frozen)  # the budget's first reduction of its options
    cheaper_label: str = ""  # that reduction, in the report
    drop_rank: int | None = None  # dropped by the budget in this order (lower first); None: kept to the end

    @property
    def cost_option(self) -> str | None:
        """The option that multiplies the passes per map (``n_steps``...), or None."""
        return self.cost.split(" x ", 1)[1] if " x " in self.cost else None


ALL: tuple[AttributionMethod, ...] = (
    AttributionMethod("saliency", "saliency", "Saliency", "Simonyan et al. 2014", default=True, reads_gradient=True),
    AttributionMethod(
        "input_x_gradient",
        "input x gradient",
        "InputXGradient",
        "Shrikumar et al. 2016",
        default=True,
        reads_gradient=True,
        drop_rank=3,
    ),
    AttributionMethod(
        "integrated_gradients",
        "integrated gradients",
        "IntegratedGradients",
        "Sundararajan et al. 2017",
        modalities=("image", "text"),
        default=True,
        options=_frozen({"n_steps": 32, "method": "gausslegendre"}),
        study_options=_frozen({"n_steps": 16}),
        faithful=True,
        cost="backward x n_steps",
        cost_default=16,
        cheaper=_frozen({"n_steps": 8}),
        cheaper_label="Integrated Gradients steps",
    ),
    AttributionMethod(
        "smoothgrad",
        "SmoothGrad",
        "NoiseTunnel",
        "Smilkov et al. 2017",
        default=True,
        options=_frozen({"nt_samples": 8, "noise_level": 0.15, "inner": "saliency", "nt_type": "smoothgrad"}),
        study_options=_frozen({"nt_samples": 8}),
        stochastic=True,
        cost="backward x nt_samples",
        cost_default=8,
        cheaper=_frozen({"nt_samples": 4}),
        cheaper_label="SmoothGrad samples",
        drop_rank=5,
    ),
    AttributionMethod(
        "gradient_shap",
        "GradientSHAP",
        "GradientShap",
        "Lundberg & Lee 2017",
        default=True,
        options=_frozen({"n_samples": 8, "stdevs": 0.0}),
        study_options=_frozen({"n_samples": 8}),
        stochastic=True,
        cost="backward x n_samples",
        cost_default=8,
        cheaper=_frozen({"n_samples": 4}),
        cheaper_label="GradientSHAP samples",
        drop_rank=4,
    ),
    AttributionMethod(
        "occlusion",
        "occlusion",
        "Occlusion",
        "Zeiler & Fergus 2014",
        default=True,
        options=_frozen({"window": 8, "stride": 4}),
        study_options=_frozen({"window": 8, "stride": 6}),
        cost="forward per window",
    ),
    AttributionMethod(
        "grad_cam",
        "Grad-CAM",
        "LayerGradCam",
        "Selvaraju et al. 2017",
        default=True,
        options=_frozen({"layer": "auto", "interpolate_mode": "bilinear", "relu_attributions": False}),
        faithful=True,
    ),
    AttributionMethod(
        "guided_backprop", "guided backprop", "GuidedBackprop", "Springenberg et al. 2015", default=True, drop_rank=0
    ),
    AttributionMethod("deeplift", "DeepLift", "DeepLift", "Shrikumar et al. 2017", drop_rank=1),
    AttributionMethod("lrp", "LRP", "LRP", "Bach et al. 2015", drop_rank=2),
    AttributionMethod(
        "feature_ablation", "feature ablation", "FeatureAblation", "Zeiler & Fergus 2014", modalities=("text",)
    ),
)
_BY_NAME = {m.name: m for m in ALL}


def method(name: str) -> AttributionMethod:
    """The declaration of method ``name``."""
    return _BY_NAME[name]


#: The image methods, in the order the study runs them.
METHODS: tuple[str, ...] = tuple(m.name for m in ALL if "image" in m.modalities)
#: The methods run by default on image models.
DEFAULT_METHODS: tuple[str, ...] = tuple(m.name for m in ALL if m.default and "image" in m.modalities)
#: The methods of text models (token attributions).
TEXT_METHODS: tuple[str, ...] = tuple(m.name for m in ALL if "text" in m.modalities)
#: Methods with random draws (noise, baselines).
STOCHASTIC_METHODS = frozenset(m.name for m in ALL if m.stochastic)
#: Methods that read the same input gradient: saliency is its absolute value, input x gradient its product
#: with the input.
GRADIENT_METHODS: tuple[str, ...] = tuple(m.name for m in ALL if m.reads_gradient)
#: Defaults per method (any Captum ``attribute`` keyword may be passed on top of these).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {m.name: dict(m.options) for m in ALL if m.options}
#: Method options of the study (on top of :data:`DEFAULT_OPTIONS`), sized so the default run (tiny_resnet,
#: 32x32, 64 images, 8 methods, 4 maps each) stays within its time budget on 2 CPU cores.
STUDY_OPTIONS: dict[str, dict[str, Any]] = {m.name: dict(m.study_options) for m in ALL if m.study_options}
#: Methods whose maps the study scores by the deletion / insertion games (attribution_study's default).
FAITHFUL: tuple[str, ...] = tuple(m.name for m in ALL if m.faithful and "image" in m.modalities)
#: Methods dropped first when the budget is short, least informative first; the rest are kept to the end.
DROP_ORDER: tuple[str, ...] = tuple(
    m.name for m in sorted((m for m in ALL if m.drop_rank is not None), key=lambda m: m.drop_rank or 0)
)
#: The report's name of each method.
DISPLAY_NAMES: dict[str, str] = {m.name: m.display for m in ALL}


def method_spec_problem(spec: Any) -> str | None:
    """Why ``spec`` (``analysis.attribution_methods``: ``default`` or comma-separated names of :data:`METHODS`)
    names no method it can run, or None when it is fine: an unknown name, or no name at all."""
    if not isinstance(spec, str):
        return None  # the type check says so
    if spec == "default":
        return None
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        return f"unknown attribution method(s) {', '.join(unknown)}; known: default or {', '.join(METHODS)}"
    if not names:
        return f"no attribution method named; known: default or {', '.join(METHODS)}"
    return None


def choose_methods(spec: str, stage_map: Callable[[], StageMap]) -> tuple[list[str], dict[str, str]]:
    """The image methods named by ``spec`` (``default`` or comma-separated names) and those left out with the
    reason: Grad-CAM where the model has no spatial layer after its stem (``stage_map()``, asked only when
    Grad-CAM is chosen, says so)."""
    chosen = list(DEFAULT_METHODS) if spec == "default" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    skipped = {}
    if "grad_cam" in chosen and (smap := stage_map()).gradcam_layer is None:
        chosen.remove("grad_cam")
        skipped["grad_cam"] = f"Grad-CAM {smap.gradcam_reason}"
    return chosen, skipped
