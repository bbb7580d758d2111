"""Benchmark of ``tunelens compare`` at a real size: a resnet50 pair at 224 px on 64 ImageFolder images.

    python bench/compare.py [--arch resnet50] [--images 64] [--size 224] [--device cpu] [--budget S]
                            [--out artifacts/bench/compare.json]

1. Builds the pair with plain torchvision code: ``--arch`` with random weights and a 1000-class head (the
   "pretrained" model), and a copy whose head is replaced for the 4 classes of the data and whose weights
   took two SGD steps on them (the "fine-tuned" model); both saved as ``.pt`` state dicts. The data is an
   ImageFolder of ``--images`` PNGs (4 classes of coloured shapes on noise, ``--size`` px).
2. Runs ``tunelens compare --arch ARCH --base base.pt --tuned tuned.pt --data images/ --out ...`` in this
   process with default settings (``--budget`` passed on when given) and times it end to end.
3. The floor, timed in the same run: every forward pass the analyses made through a model of the
   architecture is counted (images: without autograd, or with autograd and followed by a gradient with
   respect to the input, or with autograd and a gradient at an inner layer only, Grad-CAM's, counted as a
   forward pass), then the same number of images is pushed through plain ``model(x)`` (and the input
   gradient) in batches of 32, in the default layout and (on the CPU) with channels-last weights; the
   cheaper of the two per image makes the floor, so the analyses' own choice of layout is not counted as overhead. ``ratio = total / floor``: what the analyses cost beyond the bare
   passes they made (data loading, Captum, SVDs, probes, bootstrap, figures and the report). The counts
   per model are printed too: a model's forward images over the images it was given is how often the
   same work was done.

   What the floor counts, pass by pass (:data:`FLOOR_COUNTS`; every model of the architecture: the base, the
   tuned model and every copy the analyses make of them, prepared, rewound, interpolated, randomized): the
   compare's checks and the budget's timing passes (``setup``); the shared test pass of each model
   (``evaluation``, ``cka``, with the random-weights control); the attribution study's logit checks,
   predictions, the probe head's training features and every map pass (per image and method 5 map sets;
   Integrated Gradients ``n_steps`` gradient passes, saliency one, Grad-CAM one forward, occlusion one forward per
   window, the deletion / insertion games ``2 x (steps + 1)`` forwards per image and model); rewind (a test
   pass per changed stage and ``all_but_head``), the interpolation (per alpha a BatchNorm re-estimation pass
   over the training images and a test pass) and the probes' training features (``functional``). Nothing
   else: hooks' work (Gram matrices, pooling), Captum's bookkeeping, statistics and the report are the
   overhead the ratio measures. ``passes.components`` has, per component, the images, batch sizes, the
   seconds spent inside those passes (forward calls and ``torch.autograd.grad``) and their floor, and the
   component's stage seconds; ``passes.attribution`` the study's methods, images, batch and threads.

Writes ``artifacts/bench/compare.json`` (``--out``; ``compare_cuda.json`` with ``--device cuda``): per-stage seconds (the report's timings), the
total, the floor and the ratio, the pass counts, the peak GPU memory on CUDA, and the machine.
Targets (issue 12, resnet50 at 224 px on 2 CPU cores): total under 180 s, ratio under 2.0; issue 25: vgg11_bn at
64 px (``--arch vgg11_bn --size 64``) and vit_b_16 at 224 px (``--arch vit_b_16``) under 180 s too. The JSON
also carries the budget's predicted against measured seconds per analysis and the attribution study's own timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# what `tunelens compare` runs with: tunelens sets this on import, and OpenMP reads it when torch starts it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torchvision
from PIL import Image

from bench._common import machine_info, write_json

CLASSES = ("red", "green", "blue", "white")
#: What the floor counts (written to the JSON with it): see the module docstring, step 3.
FLOOR_COUNTS = (
    "images through every forward of a model of the architecture (base, tuned, and every copy the analyses make: "
    "prepared, probe-headed, rewound, interpolated, randomized), each timed as plain model(x) at batch 32 in the "
    "cheaper layout, a pass followed by an input gradient as forward + input gradient, any other as a forward "
    "(Grad-CAM's gradient at its layer: for a ResNet's layer4 the head only): setup (the compare's checks, the stage "
    "trace, the budget's timing passes); evaluation and cka (one shared test pass per model, the random-weights "
    "control's); attribution (logit checks, predictions, the probe head's training features, every map pass: "
    "5 map sets per image and method, and the deletion / insertion games); functional (rewind: a test pass per "
    "changed stage and all_but_head; interpolation: per alpha a BatchNorm re-estimation pass in train mode and "
    "a test pass; the probes' training features). Not counted: hook work, Captum's bookkeeping, statistics, "
    "the report."
)


def make_images(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """An ImageFolder of ``n`` PNGs over 4 classes: a coloured square on noise, at a random place."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % len(CLASSES)
        img = (rng.random((size, size, 3)) * 90).astype(np.uint8)
        side = size // 3
        x0, y0 = rng.integers(0, size - side, 2)
        color = [(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 230)][c]
        img[y0 : y0 + side, x0 : x0 + side] = color
        d = root / CLASSES[c]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
    return root


def make_pair(arch: str, root: Path, size: int, seed: int = 0) -> tuple[Path, Path]:
    """A random-weights base (1000 classes) and a fine-tuned-looking copy (4 classes, two SGD steps)."""
    torch.manual_seed(seed)
    base = torchvision.models.get_model(arch, weights=None, num_classes=1000)
    tuned = copy.deepcopy(base)
    name = [n for n, m in tuned.named_modules() if isinstance(m, torch.nn.Linear)][-1]  # the head
    old = tuned.get_submodule(name)
    tuned.set_submodule(name, torch.nn.Linear(old.in_features, len(CLASSES)))
    opt = torch.optim.SGD(tuned.parameters(), lr=0.01)
    tuned.train()
    for _ in range(2):
        x, y = torch.randn(8, 3, size, size), torch.randint(0, len(CLASSES), (8,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tuned(x), y).backward()
        opt.step()
    torch.save(base.state_dict(), root / "base.pt")
    torch.save(tuned.state_dict(), root / "tuned.pt")
    return root / "base.pt", root / "tuned.pt"


SETUP = "setup"  # the compare's checks, the stage trace and the budget's timing passes, before the first analysis


class PassCounter:
    """Counts images through the forward of every model of class ``cls`` (with autograd on or off), per
    component of the run: the analysis running (the suite names it on the run's progress line before it
    starts), or :data:`SETUP` before the first one. A pass with autograd counts as ``grad`` (forward + input
    gradient) when a ``torch.autograd.grad`` with respect to its input follows it (saliency, Integrated
    Gradients, ...), else as ``autograd_forward`` (a forward pass: Grad-CAM takes its gradient at a layer, the
    head's output for a ResNet's ``layer4``, not at the input). Per component also the batch sizes, and the
    seconds spent inside those forward calls (hooks included) and in ``torch.autograd.grad``."""

    KINDS = ("no_grad", "grad", "autograd_forward")

    def __init__(self, cls: type) -> None:
        self.cls, self.images = cls, Counter()
        self.per_model: Counter = Counter()
        self.component = SETUP
        self.parts: dict[str, dict] = defaultdict(
            lambda: {**dict.fromkeys(self.KINDS, 0), "batches": Counter(), "forward_s": 0.0, "grad_s": 0.0}
        )
        self._pending: tuple[dict, torch.Tensor] | None = None  # the last pass with autograd, not yet classified
        self._orig = cls.forward

    def _settle(self, kind: str = "autograd_forward") -> None:
        if self._pending is not None:
            part, x = self._pending
            self._pending = None
            self.images[kind] += int(x.shape[0])
            part[kind] += int(x.shape[0])

    def __enter__(self) -> PassCounter:
        import tunelens.core.progress as run_line

        counter, orig = self, self._orig
        self._report, self._grad = run_line.report, torch.autograd.grad

        def forward(module, x, *a, **k):
            counter._settle()
            n = int(x.shape[0])
            counter.per_model[id(module)] += n
            part = counter.parts[counter.component]
            if torch.is_grad_enabled():
                counter._pending = (part, x)
            else:
                counter.images["no_grad"] += n
                part["no_grad"] += n
            part["batches"][n] += 1
            t = time.perf_counter()
            try:
                return orig(module, x, *a, **k)
            finally:
                part["forward_s"] += time.perf_counter() - t

        def report(stage, fraction=1.0, label=None):
            if stage == "analyze" and label:
                counter._settle()
                counter.component = str(label)
            return counter._report(stage, fraction, label)

        def grad(outputs, inputs, *a, **k):
            if counter._pending is not None:
                x = counter._pending[1]
                ins = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
                if any(t is x or (t.shape == x.shape and t.data_ptr() == x.data_ptr()) for t in ins):
                    counter._settle("grad")
            t = time.perf_counter()
            try:
                return counter._grad(outputs, inputs, *a, **k)
            finally:
                counter.parts[counter.component]["grad_s"] += time.perf_counter() - t

        self.cls.forward = forward  # type: ignore[method-assign]
        run_line.report = report
        torch.autograd.grad = grad
        return self

    def __exit__(self, *exc) -> None:
        import tunelens.core.progress as run_line

        self._settle()
        self.cls.forward = self._orig  # type: ignore[method-assign]
        run_line.report, torch.autograd.grad = self._report, self._grad

    def components(self, floor: dict, stages: dict[str, float]) -> dict[str, dict]:
        """Per component: its images, batch sizes, seconds in its passes, their floor and its stage seconds."""
        out = {}
        for name, p in self.parts.items():
            fwd = p["no_grad"] + p["autograd_forward"]
            fl = fwd * floor["forward_s_per_image"] + p["grad"] * floor["forward_backward_s_per_image"]
            passes = p["forward_s"] + p["grad_s"]
            out[name] = {
                "forward_images_no_grad": p["no_grad"],
                "forward_images_with_grad": p["grad"] + p["autograd_forward"],
                "input_gradient_images": p["grad"],
                "batches": {str(b): c for b, c in sorted(p["batches"].items())},
                "passes_s": round(passes, 2),
                "floor_s": round(fl, 2),
                "passes_over_floor": round(passes / fl, 3) if fl > 0 else None,
                "stage_s": round(float(stages[name]), 2) if name in stages else None,
            }
        return out


def floor_seconds(arch: str, n_no_grad: int, n_grad: int, size: int, device: torch.device, batch: int = 32) -> dict:
    """Seconds of ``n_no_grad`` forward images and ``n_grad`` forward+backward images of plain torchvision code.

    On the CPU the two layouts are timed alternately (NCHW, channels-last, NCHW, ...; median of 3 after a
    warm-up each), so a shared machine's load, which drifts over seconds, weighs on both alike."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=len(CLASSES)).to(device).eval()
    layouts = {"nchw": model}
    if device.type == "cpu":  # the bare passes in the faster layout too: the floor is the cheaper of the two
        layouts["channels_last"] = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def once(m: torch.nn.Module, grad: bool) -> float:
        xx = x.clone().requires_grad_(grad)
        sync()
        t = time.perf_counter()
        if grad:  # the gradient attribution needs: with respect to the input only
            torch.autograd.grad(m(xx)[:, 0].sum(), xx)
        else:
            with torch.inference_mode():
                m(xx)
        sync()
        return time.perf_counter() - t

    times: dict[tuple[str, bool], list[float]] = {(k, g): [] for k in layouts for g in (False, True)}
    for i in range(4):  # the first round is a warm-up
        for (k, g), ts in times.items():
            t = once(layouts[k], g)
            if i:
                ts.append(t)
    per = {key: float(np.median(ts)) / batch for key, ts in times.items()}
    out = {f"{k}_{'forward_backward' if g else 'forward'}_s_per_image": v for (k, g), v in per.items()}
    fwd = min(v for (_, g), v in per.items() if not g)
    fwd_bwd = min(v for (_, g), v in per.items() if g)
    out.update(forward_s_per_image=fwd, forward_backward_s_per_image=fwd_bwd)
    out["floor_s"] = n_no_grad * fwd + n_grad * fwd_bwd
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", default=None, help="passed to tunelens compare --budget")
    ap.add_argument("--out", default=None, help="default artifacts/bench/compare.json (compare_ARCH.json otherwise)")
    args = ap.parse_args(argv)
    from tunelens.cli import main as tunelens_main

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_images(root / "images", args.images, args.size)
        base, tuned = make_pair(args.arch, root, args.size)
        argv_c = ["compare", "--arch", args.arch, "--base", str(base), "--tuned", str(tuned), "--data", str(data)]
        argv_c += ["--out", str(root / "out"), "--device", args.device, "--no-progress"]
        if args.budget is not None:
            argv_c += ["--budget", str(args.budget)]
        cls = type(torchvision.models.get_model(args.arch, weights=None, num_classes=2))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        load_start = os.getloadavg()[0]
        with PassCounter(cls) as counts:
            t = time.perf_counter()
            rc = tunelens_main(argv_c)
            total = time.perf_counter() - t
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        if rc not in (0, 1):
            raise SystemExit(f"tunelens compare exited with {rc}")
        summary = json.loads((root / "out" / "results" / "summary.json").read_text())
    n_forward = counts.images["no_grad"] + counts.images["autograd_forward"]
    floor = floor_seconds(args.arch, n_forward, counts.images["grad"], args.size, device)
    stages = {k: round(float(v), 2) for k, v in summary.get("timings", {}).items()}
    study = (summary.get("attribution") or {}).get("settings") or {}
    result = {
        "arch": args.arch,
        "images": args.images,
        "size": args.size,
        "device": args.device,
        "budget": args.budget,
        "exit_status": rc,
        "total_s": round(total, 2),
        "stages_s": stages,
        "floor": {**{k: round(v, 5) for k, v in floor.items()}, "counts": FLOOR_COUNTS},
        "ratio": round(total / floor["floor_s"], 3) if floor["floor_s"] > 0 else None,
        "passes": {
            "forward_images_no_grad": counts.images["no_grad"],
            "forward_images_with_grad": counts.images["grad"] + counts.images["autograd_forward"],
            "input_gradient_images": counts.images["grad"],
            "models_seen": len(counts.per_model),
            "components": counts.components(floor, summary.get("timings", {})),
            "attribution": {k: study.get(k) for k in ("methods", "n_images", "eval_batch", "threads")},
        },
        "peak_gpu_mem_mb": None if peak_mb is None else round(peak_mb, 1),
        "budget_summary": summary.get("budget", {}),
        "attribution_timings": (summary.get("attribution") or {}).get("timings", {}),
        "predicted_vs_measured_s": {
            k: [v, (summary.get("budget") or {}).get("measured", {}).get(k)]
            for k, v in ((summary.get("budget") or {}).get("predicted") or {}).items()
        },
        "failed": summary.get("failed", {}),
        "targets": {"total_s": 180, "ratio": 2.0},
        "machine": {**machine_info(), "loadavg_1m_start": load_start},
    }
    name = "compare.json" if args.arch == "resnet50" and args.size == 224 else f"compare_{args.arch}_{args.size}.json"
    if device.type != "cpu":
        name = name.replace(".json", f"_{device.type}.json")
    path = write_json(args.out or f"artifacts/bench/{name}", result)
    shown = ("arch", "device", "total_s", "stages_s", "floor", "ratio", "passes", "peak_gpu_mem_mb", "budget_summary")
    shown += ("attribution_timings", "predicted_vs_measured_s")
    print(json.dumps({k: result[k] for k in shown}, indent=1))
    print(f"written: {path}")
    return result


if __name__ == "__main__":
    main()
