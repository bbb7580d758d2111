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
   architecture is counted (images, with or without autograd: a pass with autograd is followed by a
   backward pass), then the same number of images is pushed through plain ``model(x)`` (and
   ``.backward()``) in batches of 32, in the default layout and (on the CPU) with channels-last weights; the
   cheaper of the two per image makes the floor, so the analyses' own choice of layout is not counted as overhead. ``ratio = total / floor``: what the analyses cost beyond the bare
   passes they made (data loading, Captum, SVDs, probes, bootstrap, figures and the report). The counts
   per model are printed too: a model's forward images over the images it was given is how often the
   same work was done.

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
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torchvision
from PIL import Image

from bench._common import machine_info, write_json

CLASSES = ("red", "green", "blue", "white")


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


class PassCounter:
    """Counts images through the forward of every model of class ``cls`` (with autograd on or off)."""

    def __init__(self, cls: type) -> None:
        self.cls, self.images = cls, Counter()
        self.per_model: Counter = Counter()
        self._orig = cls.forward

    def __enter__(self) -> PassCounter:
        counter, orig = self, self._orig

        def forward(module, x, *a, **k):
            key = "grad" if torch.is_grad_enabled() else "no_grad"
            counter.images[key] += int(x.shape[0])
            counter.per_model[id(module)] += int(x.shape[0])
            return orig(module, x, *a, **k)

        self.cls.forward = forward  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc) -> None:
        self.cls.forward = self._orig  # type: ignore[method-assign]


def floor_seconds(arch: str, n_no_grad: int, n_grad: int, size: int, device: torch.device, batch: int = 32) -> dict:
    """Seconds of ``n_no_grad`` forward images and ``n_grad`` forward+backward images of plain torchvision code."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=len(CLASSES)).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def per_image(grad: bool, reps: int = 3) -> float:
        xx = x.clone().requires_grad_(grad)
        times = []
        for i in range(reps + 1):
            sync()
            t = time.perf_counter()
            if grad:  # the gradient attribution needs: with respect to the input only
                torch.autograd.grad(model(xx)[:, 0].sum(), xx)
            else:
                with torch.inference_mode():
                    model(xx)
            sync()
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t)
        return float(np.median(times)) / batch

    fwd, fwd_bwd = per_image(False), per_image(True)
    out = {"nchw_forward_s_per_image": fwd, "nchw_forward_backward_s_per_image": fwd_bwd}
    if device.type == "cpu":  # the bare passes in the faster layout too: the floor is the cheaper of the two
        model = model.to(memory_format=torch.channels_last)
        cl = per_image(False), per_image(True)
        out.update(channels_last_forward_s_per_image=cl[0], channels_last_forward_backward_s_per_image=cl[1])
        fwd, fwd_bwd = min(fwd, cl[0]), min(fwd_bwd, cl[1])
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
        with PassCounter(cls) as counts:
            t = time.perf_counter()
            rc = tunelens_main(argv_c)
            total = time.perf_counter() - t
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        if rc not in (0, 1):
            raise SystemExit(f"tunelens compare exited with {rc}")
        summary = json.loads((root / "out" / "results" / "summary.json").read_text())
    floor = floor_seconds(args.arch, counts.images["no_grad"], counts.images["grad"], args.size, device)
    stages = {k: round(float(v), 2) for k, v in summary.get("timings", {}).items()}
    result = {
        "arch": args.arch,
        "images": args.images,
        "size": args.size,
        "device": args.device,
        "budget": args.budget,
        "exit_status": rc,
        "total_s": round(total, 2),
        "stages_s": stages,
        "floor": {k: round(v, 5) for k, v in floor.items()},
        "ratio": round(total / floor["floor_s"], 3) if floor["floor_s"] > 0 else None,
        "passes": {
            "forward_images_no_grad": counts.images["no_grad"],
            "forward_images_with_grad": counts.images["grad"],
            "models_seen": len(counts.per_model),
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
        "machine": machine_info(),
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
