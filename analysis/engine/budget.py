"""A time budget for the analyses: time one batch of passes first, then size the costly settings to fit.

The analyses that cost most on real models, and whose size is a choice rather than a definition, are the
attribution study (images x methods x five sets of maps) and the interventions (rewind per stage,
interpolation steps, each a pass over the test split). :func:`measure_pass_costs` times one forward and one
forward + backward pass of the base model on a batch of test images; :func:`attribution_cost` and
:func:`functional_cost` turn a configuration into seconds from those per-image costs (counting the passes
each method makes: Integrated Gradients ``n_steps`` backward passes per map, occlusion one forward pass per
window position, ...). :func:`fit_attribution` and :func:`fit_functional` then reduce, in a fixed order, until
the prediction fits the seconds left:

1. attribution: cheaper settings first (Integrated Gradients 16 -> 8 steps, SmoothGrad and GradientSHAP
   8 -> 4 samples, occlusion on a 4 x 4 instead of a 5 x 5 grid); then the methods that say least (guided
   backprop, which fails the randomization test of Adebayo et al. 2018, then input x gradient, GradientSHAP,
   SmoothGrad); then the deletion / insertion games; then occlusion, keeping saliency, Integrated Gradients
   and Grad-CAM; then the number of images, down to 4.
2. interventions: interpolation steps (11 -> 5), then a class-balanced subset of the test images for rewind,
   interpolation and probes (down to 32), then 3 interpolation steps (the barrier read at alpha 0.5 only).

Every reduction is returned as a :class:`Reduction` (setting, from, to, and what it does to the uncertainty:
a mean over ``m`` instead of ``n`` images has a confidence interval about ``sqrt(n/m)`` times wider); the
suite lists them in the report and adds them to the uncertainty of the affected findings. Nothing is cut
silently.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from tunelens.analysis.measures.attribution.attribute import shares_gradient
from tunelens.analysis.measures.attribution.methods import ALL, DROP_ORDER, FAITHFUL, GRADIENT_METHODS, method

__all__ = [
    "AttributionPlan",
    "PassCosts",
    "Reduction",
    "attribution_cost",
    "fit_attribution",
    "fit_functional",
    "functional_cost",
    "measure_pass_costs",
    "resolve_budget",
]

#: ``auto`` on a CPU: seconds of analyses. With loading and the report a run stays under 3 minutes even where the
#: predictions run short: for resnet50 at 224 px the attribution study took 1.3 to 1.45x its prediction (the
#: passes are timed at batch 8; Integrated Gradients runs larger batches, slower per image on this CPU), so 150 s
#: of analyses made runs of 189 to 190 s in all (bench/compare.py, session 5).
CPU_DEFAULT_S = 120.0
#: Map sets per method and image: base, tuned, ceiling, floor, floor_top.
MAP_SETS = 5
#: Default budget of the analysis stage on a CPU (seconds): with loading and the report, a run of about 3 minutes.


@dataclass(frozen=True)
class PassCosts:
    """Seconds per image of a forward pass (no autograd) and of a forward + backward pass (input gradient)."""

    forward_s: float
    backward_s: float
    batch: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Reduction:
    """One setting reduced to fit the budget, and what that does to the affected findings."""

    analysis: str
    setting: str
    before: Any
    after: Any
    effect: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_budget(value: Any, device: torch.device) -> float | None:
    """Seconds of the analysis stage from ``analysis.budget``: a number, ``"none"`` (no limit) or ``"auto"``
    (:data:`CPU_DEFAULT_S` on a CPU, no limit on CUDA)."""
    if value is None or value == "none":
        return None
    if value == "auto":
        return None if device.type == "cuda" else CPU_DEFAULT_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"analysis.budget must be seconds, 'auto' or 'none', got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"analysis.budget must be positive seconds, got {value!r}")
    return seconds


def _inputs(data: Any, n: int) -> torch.Tensor:
    items = [data[i] for i in range(min(n, len(data)))]
    return torch.stack([torch.as_tensor(it[0] if isinstance(it, (tuple, list)) else it) for it in items])


def measure_pass_costs(model: nn.Module, data: Any, device: torch.device, batch: int = 8) -> PassCosts:
    """Time one forward pass and one forward + backward pass (gradient of the top logit with respect to the
    input, as attribution does) of ``model`` on ``batch`` images of ``data``, after one warm-up pass each.
    The model's training flag is restored."""
    x = _inputs(data, batch).to(device)
    was_training = model.training
    model.eval()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        with torch.inference_mode():
            model(x)
            sync()
            t = time.perf_counter()
            model(x)
            sync()
            fwd = time.perf_counter() - t
        xg = x.clone().requires_grad_(True)
        for _ in range(2):  # a warm-up, then the timed pass
            sync()
            t = time.perf_counter()
            out = model(xg)
            torch.autograd.grad(out.max(dim=1).values.sum(), xg)
            sync()
            bwd = time.perf_counter() - t
    finally:
        model.train(was_training)
    n = len(x)
    return PassCosts(forward_s=fwd / n, backward_s=bwd / n, batch=n)


def _occlusion_positions(options: Mapping[str, Any], side: int) -> int:
    occ = options.get("occlusion", {})
    window = int(occ.get("window", max(2, side // 4)))
    stride = int(occ.get("stride", max(1, side * 3 // 16)))
    per_axis = max(1, (side - window) // stride + 1)
    return per_axis * per_axis


def attribution_cost(
    methods: Sequence[str],
    n_images: int,
    options: Mapping[str, Mapping[str, Any]],
    costs: PassCosts,
    side: int,
    faithfulness: Sequence[str] = FAITHFUL,
    faithfulness_steps: int = 16,
) -> float:
    """Predicted seconds of :func:`~tunelens.analysis.measures.attribution.study.attribution_study`: per image and
    method, :data:`MAP_SETS` sets of maps, each costing the method's passes, plus the deletion / insertion
    games (``2 x (steps + 1)`` forward passes per model) for ``faithfulness``."""
    b, f = costs.backward_s, costs.forward_s
    per_image = 0.0
    # input x gradient reads saliency's gradient when both run with default options (attribution_study)
    shared = shares_gradient(methods, options)
    for m in methods:
        o, decl = options.get(m, {}), method(m)  # passes per map: the method's declared cost
        if shared and m in GRADIENT_METHODS[1:]:
            c = 0.0
        elif decl.cost_option is not None:
            c = int(o.get(decl.cost_option, decl.cost_default)) * b
        elif decl.cost == "forward per window":
            c = (_occlusion_positions(options, side) + 1) * f
        else:
            c = b
        per_image += MAP_SETS * c
        if m in faithfulness:
            per_image += 2 * 2 * (faithfulness_steps + 1) * f
    return n_images * per_image


#: The methods whose options the budget makes cheaper first (fewer steps or samples), in table order.
CHEAPER = tuple(m for m in ALL if m.cheaper)


def _cheaper_options(options: Mapping[str, Mapping[str, Any]], side: int) -> dict[str, dict[str, Any]]:
    out = {m: dict(o) for m, o in options.items()}
    for decl in CHEAPER:
        out.setdefault(decl.name, {}).update(decl.cheaper)
    window = max(2, side // 4)
    out.setdefault("occlusion", {}).update(window=window, stride=max(1, (side - window) // 3))  # a 4 x 4 grid
    return out


@dataclass(frozen=True)
class AttributionPlan:
    """What the attribution study runs within its share of the budget (:func:`fit_attribution`)."""

    methods: list[str]
    n_images: int
    options: dict[str, dict[str, Any]]
    faithfulness: bool
    reductions: list[Reduction]
    predicted_s: float


def fit_attribution(
    seconds: float,
    methods: Sequence[str],
    n_images: int,
    options: Mapping[str, Mapping[str, Any]],
    costs: PassCosts,
    side: int,
) -> AttributionPlan:
    """Methods, images, options and faithfulness games of the attribution study that fit ``seconds``, reduced
    in the order of the module docstring, with the reductions made and the predicted seconds of what is kept."""
    methods, opts = list(methods), {m: dict(o) for m, o in options.items()}
    faith = True
    red: list[Reduction] = []

    def cost(ms: Sequence[str], n: int, o: Mapping[str, Mapping[str, Any]], f: bool) -> float:
        return attribution_cost(ms, n, o, costs, side, faithfulness=FAITHFUL if f else ())

    def plan(n: int) -> AttributionPlan:
        return AttributionPlan(methods, n, opts, faith, red, cost(methods, n, opts, faith))

    if cost(methods, n_images, opts, faith) <= seconds:
        return plan(n_images)
    cheap = _cheaper_options(opts, side)
    for decl in CHEAPER:
        if decl.name in methods:
            key = decl.cost_option
            assert key is not None
            before = opts.get(decl.name, {}).get(key, decl.cost_default)
            effect = "coarser maps of this method (more approximation error per map), the same images"
            red.append(Reduction("attribution", decl.cheaper_label, before, cheap[decl.name][key], effect))
    if "occlusion" in methods:
        effect = "coarser occlusion maps (larger steps between window positions)"
        red.append(Reduction("attribution", "occlusion grid", "5 x 5", "4 x 4", effect))
    opts = cheap
    for m in DROP_ORDER:
        if cost(methods, n_images, opts, faith) <= seconds or len(methods) <= 1:
            break
        if m in methods:
            methods.remove(m)
            red.append(Reduction("attribution", f"method {m}", "run", "left out", "no findings from this method"))
    if cost(methods, n_images, opts, faith) > seconds and any(m in FAITHFUL for m in methods):
        faith = False
        red.append(
            Reduction(
                "attribution",
                "deletion / insertion games",
                "run",
                "left out",
                "no faithfulness scores (whether the maps point at what the model uses)",
            )
        )
    if cost(methods, n_images, opts, faith) > seconds and "occlusion" in methods and len(methods) > 1:
        methods.remove("occlusion")
        red.append(Reduction("attribution", "method occlusion", "run", "left out", "no findings from this method"))
    n = n_images
    if cost(methods, n, opts, faith) > seconds:
        per_image = cost(methods, 1, opts, faith)
        n = max(min(4, n_images), min(n_images, int(seconds // per_image)))
        if n < n_images:
            red.append(
                Reduction(
                    "attribution",
                    "images",
                    n_images,
                    n,
                    f"confidence intervals of attribution findings about {math.sqrt(n_images / n):.1f}x wider "
                    f"(a mean over {n} images instead of {n_images})",
                )
            )
    return plan(n)


def functional_cost(
    n_test: int, n_train: int, n_tuned: int, n_stages: int, steps: int, n_probe_models: int, costs: PassCosts
) -> float:
    """Predicted seconds of the interventions step: a test pass per rewound stage group (the stages and
    ``all_but_head``) and tuned model, a test pass and a batch-norm re-estimation pass over the training images
    (at most 4 batches of 64) per interpolation step, and a training pass per probed model. The unchanged
    models' accuracy, the interpolation's endpoints and the probes' test features come from the shared test
    pass (:mod:`tunelens.analysis.engine.passes`), whose cost is the evaluation's."""
    f = costs.forward_s
    rewind = n_tuned * n_stages * n_test * f
    interp = steps * (n_test + min(n_train, 256)) * f
    probes = n_probe_models * n_train * f
    return rewind + interp + probes


def fit_functional(
    seconds: float,
    n_test: int,
    n_train: int,
    n_tuned: int,
    n_stages: int,
    steps: int,
    n_probe_models: int,
    costs: PassCosts,
) -> tuple[int, int | None, list[Reduction], float]:
    """Interpolation steps and test images (None: all) of the interventions that fit ``seconds``, the
    reductions made, and the predicted seconds."""
    red: list[Reduction] = []

    def cost(st: int, nt: int) -> float:
        return functional_cost(nt, n_train, n_tuned, n_stages, st, n_probe_models, costs)

    if cost(steps, n_test) <= seconds:
        return steps, None, red, cost(steps, n_test)
    new_steps = min(steps, 5)
    if new_steps < steps:
        red.append(
            Reduction(
                "functional",
                "interpolation steps",
                steps,
                new_steps,
                "the loss barrier is read on a coarser path (a narrow bump between two points can be missed)",
            )
        )
    steps = new_steps
    n = n_test
    if cost(steps, n) > seconds and n_test > 32:
        fixed = cost(steps, 0)
        per = (cost(steps, n_test) - fixed) / n_test
        n = max(32, min(n_test, int(max(0.0, seconds - fixed) // per)))
        if n < n_test:
            red.append(
                Reduction(
                    "functional",
                    "test images for rewind, interpolation and probes",
                    n_test,
                    n,
                    f"accuracy differences of rewind, interpolation and probes about {math.sqrt(n_test / n):.1f}x "
                    f"less certain (measured on {n} images instead of {n_test})",
                )
            )
    if cost(steps, n) > seconds and steps > 3:  # last: the barrier read at the midpoint only
        first = next((i for i, r in enumerate(red) if r.setting == "interpolation steps"), None)
        before = red[first].before if first is not None else steps
        cut = Reduction(
            "functional",
            "interpolation steps",
            before,
            3,
            "the loss barrier is read at alpha 0.5 only (a bump elsewhere on the path can be missed)",
        )
        red = [cut if i == first else r for i, r in enumerate(red)] if first is not None else [cut, *red]
        steps = 3
    return steps, (n if n < n_test else None), red, cost(steps, n)
