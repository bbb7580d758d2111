"""Channels-last (NHWC) weights against the default NCHW layout, per architecture, on this machine.

    python bench/channels_last.py [--out artifacts/bench/channels_last.json]

For each architecture (random weights, eval mode) it times a forward pass under ``torch.inference_mode`` and an
input-gradient pass (what attribution needs), first in the default layout, then with the weights converted to
``torch.channels_last`` (inputs stay NCHW, as the analyses feed them); best of 3 after a warm-up, both in this
run. ``speedup = NCHW seconds / channels-last seconds``. Also, per architecture, the channels-last forward pass
under ``torch.no_grad`` against ``torch.inference_mode`` (``no_grad_over_inference_mode``: above 1 when
inference mode is faster; the analyses' passes use ``no_grad``). The rule the analyses follow
(:func:`tunelens.core.models.channels_last_helps`: CPU, Conv2d + BatchNorm2d, no LayerNorm) is printed beside.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torchvision

from bench._common import machine_info, write_json

CASES = (
    ("tiny_resnet", 32, 64),
    ("resnet18", 64, 64),
    ("resnet50", 224, 32),
    ("efficientnet_b0", 224, 16),
    ("mobilenet_v3_small", 224, 32),
    ("densenet121", 224, 8),
    ("vgg11", 224, 8),
    ("convnext_tiny", 224, 16),
)


def seconds(model: torch.nn.Module, x: torch.Tensor, grad: bool, reps: int = 3, no_grad: bool = False) -> float:
    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        if no_grad:
            with torch.no_grad():
                model(x)
        elif grad:
            xg = x.clone().requires_grad_(True)
            torch.autograd.grad(model(xg)[:, 0].sum(), xg)
        else:
            with torch.inference_mode():
                model(x)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="artifacts/bench/channels_last.json")
    ap.add_argument("--archs", default=",".join(c[0] for c in CASES))
    args = ap.parse_args(argv)
    from tunelens.core.models import channels_last_helps
    from tunelens.finetune.models import build_model

    torch.manual_seed(0)
    rows = []
    for arch, size, batch in CASES:
        if arch not in args.archs.split(","):
            continue
        if arch == "tiny_resnet":
            model = build_model(arch, 6, seed=0)
        else:
            model = torchvision.models.get_model(arch, weights=None, num_classes=6)
        model.eval()
        x = torch.randn(batch, 3, size, size)
        nchw = (seconds(model, x, False), seconds(model, x, True))
        model = model.to(memory_format=torch.channels_last)
        nhwc = (seconds(model, x, False), seconds(model, x, True))
        plain = seconds(model, x, False, no_grad=True)
        row = {
            "arch": arch,
            "size": size,
            "batch": batch,
            "nchw_s": [round(v, 4) for v in nchw],
            "channels_last_s": [round(v, 4) for v in nhwc],
            "speedup_forward": round(nchw[0] / nhwc[0], 3),
            "speedup_input_gradient": round(nchw[1] / nhwc[1], 3),
            "rule_uses_channels_last": channels_last_helps(model, "cpu"),
            "no_grad_over_inference_mode": round(plain / nhwc[0], 3),
        }
        rows.append(row)
        print(
            f"{arch:20s} {size:4d} px batch {batch:3d}: forward x{row['speedup_forward']:.2f}, input gradient "
            f"x{row['speedup_input_gradient']:.2f}; rule: {'channels-last' if row['rule_uses_channels_last'] else 'NCHW'}; "
            f"no_grad / inference_mode {row['no_grad_over_inference_mode']:.2f}",
            flush=True,
        )
    result = {"rows": rows, "machine": machine_info()}
    print(f"written: {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
