"""Benchmark of tunelens attribution: Captum's overhead over plain gradients, and the default stage's time.

    python bench/attribution.py [--quick] [--threads 1] [--stage-threads N] [--device cpu] [--repeats 7]
                                [--run-dir DIR [--tuned full]] [--out artifacts/bench/attribution.json]

1. **cost**: Integrated Gradients (32 steps, zero baseline) over 64 images of the default model
   (tiny_resnet, 32x32) through :func:`analysis.attribute` against the same number of forward +
   backward passes done by hand (the 64 x 32 path points, in batches of the same size as IG's
   ``internal_batch_size``, gradient of the target logits with respect to the inputs). Timed
   alternately, ``--repeats`` times, with ``--threads`` torch threads (1 by default); the headline
   ratio is the median of the paired ratios of process CPU time with one thread on the CPU (on a
   shared machine wall time mostly measures the neighbours), of wall time otherwise; both are
   written. Target: ratio <= 1.25.
2. **stage**: the default run's attribution stage at its default size: :func:`tunelens.analysis.measures.attribution.study`
   with a tiny_resnet base pretrained-style head (8 source classes, so the linear-probe head is fitted)
   and a fine-tuned-style model (6 target classes), 64 test images of the embedded shapes data, all
   default methods (base, tuned, ceiling and floor maps, comparisons, mask metrics, deletion and
   insertion games), with torch's default number of threads (``--stage-threads`` to change it).
   Wall time and per-method timings. Target: under 60 s on this machine.
   (Untrained weights cost the same as trained ones.)
3. **default run** (with ``--run-dir`` pointing at a finished ``tunelens run`` output folder, or its
   ``checkpoints`` folder): the stage on the run's real base and fine-tuned (``--tuned``, default
   ``full``) models instead of untrained ones, and the check that Integrated Gradients and Grad-CAM
   are informative with a change index above the threshold while guided backprop is flagged.

Writes ``artifacts/bench/attribution.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

import torch

from bench._common import machine_info, paired_ratio, set_threads, time_interleaved, write_json

RATIO_TARGET = 1.25
STAGE_TARGET_S = 60.0


def _cost(device: str, n_images: int, n_steps: int, batch: int, repeats: int, threads: int) -> dict:
    from tunelens.analysis.measures.attribution.attribute import attribute_group
    from tunelens.analysis.measures.attribution.prepare import prepare_for_attribution
    from tunelens.finetune.models import build_model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_images, 3, 32, 32, generator=g).to(device)
    t = torch.randint(0, 6, (n_images,), generator=g).to(device)
    model = prepare_for_attribution(build_model("tiny_resnet", 6, seed=0), x, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def captum_ig():
        return attribute_group([model], x, [t], "integrated_gradients", n_steps=n_steps, eval_batch=batch)[0]

    # the same path points and batches as Captum's internal batching: ``batch // n_images`` steps per pass
    from captum.attr._utils.approximation_methods import approximation_parameters

    _step_sizes_fn, alphas_fn = approximation_parameters("gausslegendre")
    alphas = torch.tensor(alphas_fn(n_steps), dtype=x.dtype, device=device)
    per = max(1, batch // n_images)

    def by_hand():
        total = torch.zeros_like(x)
        for s in range(0, n_steps, per):
            a = alphas[s : s + per]
            xs = (a.view(-1, 1, 1, 1, 1) * x[None]).reshape(-1, *x.shape[1:]).requires_grad_(True)
            out = model(xs)
            (grad,) = torch.autograd.grad(out.gather(1, t.repeat(len(a))[:, None]).sum(), xs)
            total += grad.view(len(a), *x.shape).sum(0)
        return total

    times = time_interleaved({"captum_ig": captum_ig, "by_hand": by_hand}, repeats=repeats, warmup=1, sync=sync)
    key = "cpu_times" if threads == 1 and not device.startswith("cuda") else "times"
    return {
        "n_images": n_images,
        "n_steps": n_steps,
        "passes": n_images * n_steps,
        "batch": batch,
        "threads": threads,
        "ratio_basis": key,
        "ratio": paired_ratio(times, "captum_ig", "by_hand", key),
        "ratio_cpu": paired_ratio(times, "captum_ig", "by_hand", "cpu_times"),
        "ratio_wall": paired_ratio(times, "captum_ig", "by_hand", "times"),
        "captum_ig_s": times["captum_ig"]["median"],
        "by_hand_s": times["by_hand"]["median"],
        "captum_ig_cpu_s": times["captum_ig"]["cpu_median"],
        "by_hand_cpu_s": times["by_hand"]["cpu_median"],
        "times": times,
    }


def _run_models(run_dir: str, tuned_name: str):
    from tunelens.finetune.checkpoints import load_checkpoint
    from tunelens.finetune.data import ShapesSpec
    from tunelens.finetune.models import build_model

    d = Path(run_dir)
    if (d / "checkpoints").is_dir():
        d = d / "checkpoints"
    models, mans = {}, {}
    for name in ("base", tuned_name):
        sd, man = load_checkpoint(d / f"{name}.safetensors")
        m = build_model(man["arch"], man["num_classes"])
        m.load_state_dict(sd)
        models[name], mans[name] = m.eval(), man
    spec = dict(mans[tuned_name]["data"])
    spec.pop("name", None)
    spec["classes"] = tuple(spec["classes"])
    return models["base"], models[tuned_name], ShapesSpec(**spec), mans


def _stage(device: str, n_images: int, run_dir: str | None = None, tuned_name: str = "full") -> dict:
    from tunelens.analysis.measures.attribution.study import attribution_study
    from tunelens.finetune.data import ShapesSpec, make_shapes
    from tunelens.finetune.models import build_model

    if run_dir:
        base, tuned, spec, mans = _run_models(run_dir, tuned_name)
        source = {
            "run_dir": str(run_dir),
            "tuned": tuned_name,
            "test_acc": {k: m.get("metrics", {}).get("test_acc") for k, m in mans.items()},
        }
    else:
        spec = ShapesSpec(task="target")
        base = build_model("tiny_resnet", 8, seed=0).eval()
        tuned = build_model("tiny_resnet", 6, seed=1).eval()
        source = {"run_dir": None, "note": "untrained tiny_resnet pair (8-class base, 6-class tuned)"}
    data = make_shapes(spec)
    t, c = time.perf_counter(), time.process_time()
    res = attribution_study(base, tuned, data["test"], n_images=n_images, probe_data=data["train"], device=device)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    cols = [
        "method",
        "ab",
        "ceiling",
        "floor",
        "floor_top",
        "gap",
        "gap_top",
        "change_index",
        "change_index_lo",
        "change_index_hi",
        "informative",
    ]
    out = {
        "models": source,
        "n_images": n_images,
        "methods": res.settings["methods"],
        "seconds": wall,
        "cpu_seconds": cpu,
        "timings": res.timings,
        "eval_batch": res.settings["eval_batch"],
        "threads_used": res.settings["threads"],
        "options": res.settings["options"],
        "target_s": STAGE_TARGET_S,
        "ok": wall <= STAGE_TARGET_S,
        "summary": res.summary[cols].to_dict(orient="records"),
        "notes": res.notes,
    }
    if run_dir:
        s = res.summary.set_index("method")
        thr = float(s["threshold"].iloc[0])
        checks = {f"{m}_informative": bool(s.loc[m, "informative"]) for m in ("integrated_gradients", "grad_cam")}
        checks.update(
            {
                f"{m}_change_index_above_threshold": bool(s.loc[m, "change_index"] > thr)
                for m in ("integrated_gradients", "grad_cam")
            }
        )
        checks["guided_backprop_flagged"] = not bool(s.loc["guided_backprop", "informative"])
        out["default_run_checks"] = {**checks, "ok": all(checks.values())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer images and repeats (a smoke run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the cost ratio (default 1)")
    p.add_argument("--stage-threads", type=int, default=None, help="torch threads for the stage (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch", type=int, default=256, help="images per forward/backward pass (IG internal batch)")
    p.add_argument("--skip-stage", action="store_true", help="only the cost ratio")
    p.add_argument(
        "--run-dir",
        default=None,
        help="a finished run's output (or checkpoints) folder: time the stage "
        "on its real models and check the informative flags",
    )
    p.add_argument("--tuned", default="full", help="the fine-tuned checkpoint of --run-dir (default: full)")
    p.add_argument("--out", default="artifacts/bench/attribution.json")
    args = p.parse_args(argv)
    default_threads = torch.get_num_threads()
    threads = set_threads(args.threads)
    n_images, repeats = (16, 2) if args.quick else (64, args.repeats)
    out: dict = {"machine": machine_info(), "device": args.device, "quick": args.quick}
    cost = _cost(args.device, n_images, 32, args.batch, repeats, threads)
    out["cost"] = {**cost, "target": RATIO_TARGET, "ok": cost["ratio"] <= RATIO_TARGET}
    out["ratio"] = cost["ratio"]
    print(
        f"IG (32 steps) over {n_images} images vs {cost['passes']} forward+backward passes by hand "
        f"(batches of {args.batch}, {threads} thread(s)): ratio {cost['ratio']:.3f} "
        f"({'CPU time' if cost['ratio_basis'] == 'cpu_times' else 'wall'}; wall {cost['ratio_wall']:.3f}, "
        f"CPU {cost['ratio_cpu']:.3f}); medians {cost['captum_ig_s']:.2f}s vs {cost['by_hand_s']:.2f}s  "
        f"[target <= {RATIO_TARGET}] {'OK' if out['cost']['ok'] else 'OVER'}"
    )
    if not args.skip_stage:
        out["stage_threads"] = set_threads(args.stage_threads or default_threads)
        stage = _stage(args.device, 16 if args.quick else 64, args.run_dir, args.tuned)
        out["stage"] = stage
        per = ", ".join(f"{k} {v:.1f}s" for k, v in stage["timings"].items() if k != "total")
        print(
            f"attribution stage ({stage['n_images']} images, {len(stage['methods'])} methods, "
            f"{stage['threads_used']} thread(s)): "
            f"{stage['seconds']:.1f}s wall, {stage['cpu_seconds']:.1f}s CPU [target < {STAGE_TARGET_S:.0f}s] "
            f"{'OK' if stage['ok'] else 'OVER'}\n  {per}"
        )
        for r in stage["summary"]:
            print(
                f"  {r['method']:<22} AB {r['ab']:.3f}  ceiling {r['ceiling']:.3f}  floor {r['floor']:.3f}  "
                f"floor_top {r['floor_top']:.3f}  change index {r['change_index']:+.2f}  "
                f"{'informative' if r['informative'] else 'FLAGGED'}"
            )
        if "default_run_checks" in stage:
            print(f"  default-run checks: {stage['default_run_checks']}")
    with contextlib.suppress(OSError):
        out["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    path = write_json(args.out, out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
