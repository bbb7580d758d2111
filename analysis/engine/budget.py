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
   and Grad-CAM; then the number of images, down to 4; last, Integrated Gradients on 4 steps.
2. interventions: interpolation steps (11 -> 5), then a class-balanced subset of the test images for rewind,
   interpolation and probes (down to 32), then 3 interpolation steps (the barrier read at alpha 0.5 only).

Every reduction is returned as a :class:`Reduction` (setting, from, to, and what it does to the uncertainty:
a mean over ``m`` instead of ``n`` images has a confidence interval about ``sqrt(n/m)`` times wider); the
suite lists them in the report and adds them to the uncertainty of the affected findings. Nothing is cut
silently.
"""

from __future__ import annotations

import dataclasses
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
    "LinalgRates",
    "PassCosts",
    "Reduction",
    "attribution_cost",
    "fit_attribution",
    "fit_functional",
    "functional_cost",
    "intruders_cost",
    "measure_linalg_rates",
    "measure_pass_costs",
    "resolve_budget",
    "weights_cost",
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
class LinalgRates:
    """Seconds per unit of the matrix work of the weight analyses (one torch thread, as they run), timed on this
    machine by :func:`measure_linalg_rates`: per multiply-add of a float64 / float32 matrix product, per ``n^3``
    of a float64 eigendecomposition with vectors (``eigh``) and of float32 eigenvalues (``eigvalsh``), per entry
    of the entry-wise work on a tensor (a float64 copy, a difference, norms)."""

    matmul64_s: float
    matmul32_s: float
    eigh64_s: float
    eigvalsh32_s: float
    entry_s: float


@dataclass(frozen=True)
class PassCosts:
    """Seconds per image of a forward pass (no autograd) and of a forward + backward pass (input gradient);
    ``linalg``: the rates of the weight analyses' matrix work (None: timed when first needed)."""

    forward_s: float
    backward_s: float
    batch: int
    linalg: LinalgRates | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "linalg"}


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


def _best_of(f: Any, reps: int = 3) -> float:
    f()  # a warm-up
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


_RATES: list[LinalgRates] = []


def measure_linalg_rates(n: int = 384, cached: bool = True) -> LinalgRates:
    """Time, on one torch thread, an ``n x n`` float64 and float32 product, a float64 ``eigh`` and a float32
    ``eigvalsh`` of that size, and the entry-wise work on 2^20 entries (best of 3 after a warm-up; about
    0.1 s). ``cached``: once per process."""
    if cached and _RATES:
        return _RATES[0]
    from tunelens.core.runtime import torch_threads

    g = torch.Generator().manual_seed(0)
    a64 = torch.randn(n, n, generator=g, dtype=torch.float64)
    a32, sym = a64.float(), a64 @ a64.T
    w0 = torch.randn(1 << 20, generator=g)
    w1 = w0 + 1e-3

    def entries() -> None:
        d = w1.to(torch.float64, copy=True).sub_(w0)
        for w in (w0, w1):
            torch.linalg.vector_norm(w, dtype=torch.float64)
        torch.linalg.vector_norm(d)
        torch.linalg.vector_norm(d, ord=math.inf)

    with torch_threads(1):
        rates = LinalgRates(
            matmul64_s=_best_of(lambda: a64 @ a64) / n**3,
            matmul32_s=_best_of(lambda: a32 @ a32) / n**3,
            eigh64_s=_best_of(lambda: torch.linalg.eigh(sym)) / n**3,
            eigvalsh32_s=_best_of(lambda: torch.linalg.eigvalsh(sym.float())) / n**3,
            entry_s=_best_of(entries) / (1 << 20),
        )
    if cached:
        _RATES[:] = [rates]
    return rates


def _randomized_s(rows: int, cols: int, k: int, r: LinalgRates, niter: int = 2) -> float:
    """Seconds of :func:`~tunelens.analysis.measures.tensor_measures.randomized_svd` at ``k`` (``k + 8`` probes):
    ``2 niter + 2`` products with the matrix, a QR of a ``rows x l`` or ``cols x l`` block after each (about
    ``2 rows l^2``), and the small SVD."""
    probes = min(k + 8, rows, cols)
    products = (2 * niter + 2) * rows * cols * probes * r.matmul32_s
    qrs = (2 * niter + 2) * 2 * max(rows, cols) * probes**2 * r.matmul32_s
    return products + qrs + rows * cols * r.entry_s  # one pass to convert or copy the matrix


def weights_cost(
    tensors: Sequence[tuple[int, ...]],
    n_tuned: int,
    rates: LinalgRates,
    exact_max_numel: int | None,
    rank_k: int = 32,
) -> float:
    """Predicted seconds of the weight deltas (:func:`~tunelens.analysis.measures.weights.weight_deltas`) of
    ``n_tuned`` models whose shared tensors have the shapes ``tensors``: per tensor the entry-wise work; per
    matrix (``m x n`` tall, conv kernels ``out x in*k*k``) of at most ``exact_max_numel`` entries the Gram
    ``M^T M`` (``m n^2`` float32 multiply-adds) and its eigenvalues (``n^3``); above it the randomized top-``rank_k``
    singular values."""
    total = 0.0
    for shape in tensors:
        numel = math.prod(shape)
        total += numel * rates.entry_s
        if len(shape) < 2 or numel == 0:
            continue
        rows, cols = shape[0], numel // shape[0]
        if exact_max_numel is not None and numel > exact_max_numel:
            total += _randomized_s(rows, cols, rank_k, rates)
        else:
            m, n = max(rows, cols), min(rows, cols)
            total += m * n * n * rates.matmul32_s + n**3 * rates.eigvalsh32_s
    return n_tuned * total


def intruders_cost(
    matrices: Sequence[tuple[int, int]],
    n_tuned: int,
    n_controls: int,
    k: int,
    rates: LinalgRates,
    exact_max_numel: int | None,
    base_k: int = 32,
) -> float:
    """Predicted seconds of the intruder dimensions (:mod:`tunelens.analysis.steps.intruders`) on matrices of
    shapes ``matrices`` (``rows x cols``): the base's singular vectors once, the tuned side's for each of the
    ``n_tuned`` models and ``n_controls`` random controls (each control also draws a Gaussian matrix). Exact (at
    most ``exact_max_numel`` entries): a float64 Gram (``m n^2``), ``eigh`` (``n^3``), the left vectors of a
    tall matrix (``rows cols n``) and the cosines (``rows k n``); above it randomized top-``k`` (tuned) and
    top-``base_k`` (base) vectors."""
    total = 0.0
    sides = n_tuned + n_controls
    for rows, cols in matrices:
        numel = rows * cols
        if exact_max_numel is not None and numel > exact_max_numel:
            base = _randomized_s(rows, cols, base_k, rates)
            tuned = _randomized_s(rows, cols, k, rates) + rows * k * base_k * rates.matmul32_s
        else:
            m, n = max(rows, cols), min(rows, cols)
            one = m * n * n * rates.matmul64_s + n**3 * rates.eigh64_s + numel * rates.entry_s
            if rows > cols:
                one += rows * cols * n * rates.matmul64_s
            base, tuned = one, one + rows * min(k, n) * n * rates.matmul64_s
        total += base + sides * tuned + n_controls * 4 * numel * rates.entry_s  # the control's noise
    return total


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
    ig = "integrated_gradients"
    if (
        cost(methods, n, opts, faith) > seconds
        and ig in methods
        and int(opts.get(ig, {}).get("n_steps", 16)) > IG_LEAST
    ):
        # last of all (the smallest plan): Integrated Gradients on 4 steps, one row for its steps
        opts[ig] = {**opts.get(ig, {}), "n_steps": IG_LEAST}
        red = [dataclasses.replace(r, after=IG_LEAST) if r.setting == method(ig).cheaper_label else r for r in red]
    return plan(n)


#: Integrated Gradients steps at the smallest plan (the Riemann sum's error grows; still a path integral).
IG_LEAST = 4


def functional_cost(
    n_test: int,
    n_train: int,
    n_tuned: int,
    n_stages: int,
    steps: int,
    n_probe_models: int,
    costs: PassCosts,
    batchnorm: bool = True,
) -> float:
    """Predicted seconds of the interventions step: a test pass per rewound stage group (the stages and
    ``all_but_head``) and tuned model, a test pass and a batch-norm re-estimation pass over the training images
    (at most 4 batches of 64) per interpolation step, and a training pass per probed model. The unchanged
    models' accuracy, the interpolation's endpoints and the probes' test features come from the shared test
    pass (:mod:`tunelens.analysis.engine.passes`), whose cost is the evaluation's. ``batchnorm``: whether the
    model has BatchNorm layers (without, the interpolation re-estimates nothing)."""
    f = costs.forward_s
    rewind = n_tuned * n_stages * n_test * f
    interp = steps * (n_test + (min(n_train, 256) if batchnorm else 0)) * f
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
    batchnorm: bool = True,
) -> tuple[int, int | None, list[Reduction], float]:
    """Interpolation steps and test images (None: all) of the interventions that fit ``seconds``, the
    reductions made, and the predicted seconds."""
    red: list[Reduction] = []

    def cost(st: int, nt: int) -> float:
        return functional_cost(nt, n_train, n_tuned, n_stages, st, n_probe_models, costs, batchnorm)

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
