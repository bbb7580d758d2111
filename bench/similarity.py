"""Benchmark of tunelens CKA: cost against the plain forward passes, memory growth with N, and torch-cka.

    python bench/similarity.py [--quick] [--threads 1] [--device cpu] [--out artifacts/bench/similarity.json]

For each model pair (two torchvision resnet18 at 64x64, and the default tiny_resnet pair at 32x32):

1. **cost**: the same list of batches is run (a) through both models, eval, no grad (the floor: the
   data must go through both models once) and (b) through :func:`tunelens.analysis.measures.cka_models.cka_matrix`
   (A x B, A x A, B x B matrices, bootstrap CI of the diagonal, activation statistics and example
   feature maps); timed alternately, median of ``--repeats``. Target: (b)/(a) <= 1.25.
2. **memory**: ``cka_matrix`` over N=512 and N=4096 images, each in a fresh process with batches
   generated on the fly (so the data set itself is not held); peak RSS of the whole process and its
   rise over the RSS just before the call. Target: peak(4096) <= 1.2 peak(512).
3. **torch-cka** (PyPI ``torch-cka``, a bench-only extra): same models (copies: it never removes its
   hooks), same layers, same batches; its time over the forward passes, and its values against ours.
   Its hooks keep ``out`` itself, so layers followed by an in-place op (``bn1`` -> ReLU(inplace),
   ``layer1.0.bn2`` -> ``out += identity``) are compared separately to show where it goes wrong.

Also times a default-run-sized CKA stage (3 fine-tuned models, 360 test images at 32x32).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench._common import (
    machine_info,
    paired_ratio,
    peak_rss_mb,
    rss_mb,
    run_fresh,
    set_threads,
    time_interleaved,
    timed,
    write_json,
)

PAIRS = {
    "resnet18": {"arch": "resnet18", "classes": (10, 10), "size": 64},
    "default": {"arch": "tiny_resnet", "classes": (8, 6), "size": 32},
}


def _models(pair: str, device: str = "cpu"):
    from tunelens.finetune.models import build_model

    p = PAIRS[pair]
    a = build_model(p["arch"], p["classes"][0], seed=0).eval().to(device)
    b = build_model(p["arch"], p["classes"][1], seed=1).eval().to(device)
    return a, b


def _batch(pair: str, i: int, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    s = PAIRS[pair]["size"]
    x = torch.randn(bs, 3, s, s, generator=g)
    x = x + torch.linspace(-1, 1, s)[None, None, None, :] * torch.randn(bs, 3, 1, 1, generator=g)  # some structure
    return x, torch.zeros(bs, dtype=torch.long)


class _Generated:
    """Batches made on the fly from a seed: nothing grows with N except the count."""

    def __init__(self, pair: str, n: int, bs: int) -> None:
        self.pair, self.n, self.bs = pair, n, bs

    def __len__(self) -> int:
        return (self.n + self.bs - 1) // self.bs

    def __iter__(self):
        for i in range(len(self)):
            yield _batch(self.pair, i, min(self.bs, self.n - i * self.bs))


def memory_run(pair: str, n: int, bs: int, threads: int, device: str) -> dict:
    """In a fresh process: RSS before and peak during cka_matrix over ``n`` generated images."""
    from tunelens.analysis.measures.cka_models import cka_matrix

    set_threads(threads)
    a, b = _models(pair, device)
    before = rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = cka_matrix(a, b, _Generated(pair, n, bs), device=device, n_boot=1000)
    peak = peak_rss_mb()
    out = {
        "n": n,
        "rss_before_mb": before,
        "peak_during_mb": peak,
        "rise_mb": peak - before,
        "n_samples": res.n_samples,
    }
    if device.startswith("cuda"):
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _torch_cka(a, b, la, lb, loader, device):
    """One torch-cka run on fresh copies of the models; returns its A x B matrix (in firing order) and names."""
    import torch_cka.cka
    from torch_cka import CKA

    torch_cka.cka.tqdm = lambda it, **_: it  # no progress bar (it changes nothing else)
    ca, cb = copy.deepcopy(a), copy.deepcopy(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = CKA(ca, cb, model1_name="A", model2_name="B", model1_layers=la, model2_layers=lb, device=device)
        m.compare(loader)
    return m.hsic_matrix.numpy(), list(m.model1_features), list(m.model2_features)


def _song_explicit(a, b, la, lb, batches, dtype) -> np.ndarray:
    """torch-cka's arithmetic (explicit Song et al. formula on zero-diagonal Grams, averaged over batches) on
    *copied* features in ``dtype``: float32 reproduces torch-cka's rounding, float64 shows the formula is right."""
    from tunelens.analysis.measures.layers import iterate_pair

    def hsic(K, L):
        n = K.shape[0]
        one = torch.ones(n, 1, dtype=K.dtype)
        return (
            torch.trace(K @ L)
            + (one.T @ K @ one @ one.T @ L @ one).item() / ((n - 1) * (n - 2))
            - (one.T @ K @ L @ one).item() * 2 / (n - 2)
        ) / (n * (n - 3))

    acc = np.zeros((len(la), len(lb), 3))
    for fa, fb, _, _ in iterate_pair(a, b, batches, la, lb):
        ga = {k: (lambda x: x @ x.T)(v.flatten(1).to(dtype)).fill_diagonal_(0) for k, v in fa.items()}
        gb = {k: (lambda x: x @ x.T)(v.flatten(1).to(dtype)).fill_diagonal_(0) for k, v in fb.items()}
        for i, x in enumerate(la):
            for j, y in enumerate(lb):
                acc[i, j] += [float(hsic(ga[x], gb[y])), float(hsic(ga[x], ga[x])), float(hsic(gb[y], gb[y]))]
    return acc[:, :, 0] / np.sqrt(acc[:, :, 1] * acc[:, :, 2])


def bench_pair(
    pair: str, n: int, bs: int, repeats: int, device: str, mem_ns: tuple[int, int], threads: int, torch_cka_ok: bool
) -> dict:
    from tunelens.analysis.measures.cka_models import cka_matrix
    from tunelens.analysis.measures.layers import resolve_layers

    a, b = _models(pair, device)
    la, lb = resolve_layers(a), resolve_layers(b)
    batches = list(_Generated(pair, n, bs))
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def forward():
        with torch.no_grad():
            for x, _ in batches:
                x = x.to(device)
                a(x)
                b(x)

    fns = {"forward_both": forward, "tunelens": lambda: cka_matrix(a, b, batches, device=device)}
    loader = None
    if torch_cka_ok:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])),
            batch_size=bs,
        )
        fns["torch_cka"] = lambda: _torch_cka(a, b, la, lb, loader, device)
    t = time_interleaved(fns, repeats=repeats, warmup=1, sync=sync)
    # ratios of runs timed back to back; the headline uses process CPU time when torch runs one thread
    # (on a shared machine wall time mostly measures the neighbours), wall time otherwise
    key = "cpu_times" if threads == 1 and not device.startswith("cuda") else "times"
    ratio = {
        k: {
            "wall": paired_ratio(t, k, "forward_both"),
            "cpu": paired_ratio(t, k, "forward_both", "cpu_times"),
            "headline": paired_ratio(t, k, "forward_both", key),
        }
        for k in fns
        if k != "forward_both"
    }
    base = t["forward_both"]["median"]
    out: dict = {
        "n_images": n,
        "batch_size": bs,
        "image_size": PAIRS[pair]["size"],
        "layers_a": la,
        "layers_b": lb,
        "timings_s": t,
        "ratio_basis": key,
        "ratios": ratio,
        "ratio_tunelens_over_forward": ratio["tunelens"]["headline"],
    }
    ours = cka_matrix(a, b, batches, device=device)
    out["estimator"] = ours.estimator
    print(
        f"[{pair}] N={n} bs={bs}: forward passes (both models) {base:.3f} s wall; tunelens cka_matrix "
        f"{t['tunelens']['median']:.3f} s -> {ratio['tunelens']['headline']:.3f}x ({key}; wall "
        f"{ratio['tunelens']['wall']:.3f}x, cpu {ratio['tunelens']['cpu']:.3f}x) (target <= 1.25x)"
    )
    if torch_cka_ok:
        r = ratio["torch_cka"]["headline"]
        out["ratio_torch_cka_over_forward"] = r
        out["speedup_vs_torch_cka"] = r / ratio["tunelens"]["headline"]
        theirs, na, nb = _torch_cka(a, b, la, lb, loader, device)
        th = ours.ab.loc[na, nb].to_numpy()
        out["torch_cka_max_abs_diff_auto_layers"] = float(np.abs(theirs - th).max())
        sub = batches[: max(2, len(batches) // 4)]
        ours_sub = cka_matrix(a, b, sub, device=device, n_examples=0).ab.loc[na, nb].to_numpy()
        s64, s32 = (_song_explicit(a, b, na, nb, sub, dt) for dt in (torch.float64, torch.float32))
        out["explicit_song_float64_vs_tunelens_max_abs_diff"] = float(np.abs(s64 - ours_sub).max())
        out["explicit_song_float32_vs_float64_max_abs_diff"] = float(np.abs(s32 - s64).max())
        print(
            f"[{pair}] torch-cka: {t['torch_cka']['median']:.3f} s -> {r:.3f}x forward (wall "
            f"{ratio['torch_cka']['wall']:.3f}x); tunelens is {out['speedup_vs_torch_cka']:.2f}x faster; "
            f"max |diff| on {len(na)}x{len(nb)} auto layers: {out['torch_cka_max_abs_diff_auto_layers']:.2e}"
        )
        print(
            f"[{pair}]   why: its explicit Song formula in float32 vs float64 on copied features differs by up "
            f"to {out['explicit_song_float32_vs_float64_max_abs_diff']:.2e}; in float64 it equals tunelens to "
            f"{out['explicit_song_float64_vs_tunelens_max_abs_diff']:.1e}"
        )
        inplace = ["conv1", "bn1", "layer1.0.bn2"]  # bn1 -> ReLU(inplace); bn2 -> out += identity
        sub_loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.cat([x for x, _ in sub]), torch.cat([y for _, y in sub])),
            batch_size=bs,
        )
        ours_in = cka_matrix(a, b, sub, layers=inplace, device=device, n_examples=0).ab
        theirs_in, na, nb = _torch_cka(a, b, inplace, inplace, sub_loader, device)
        diag = {
            f"{x}": {"tunelens": float(ours_in.loc[x, x]), "torch_cka": float(theirs_in[na.index(x), nb.index(x)])}
            for x in inplace
        }
        out["inplace_layers_diagonal"] = diag
        for k, v in diag.items():
            print(
                f"[{pair}]   {k:>13}: tunelens {v['tunelens']:.4f}  torch-cka {v['torch_cka']:.4f}"
                f"  (diff {abs(v['tunelens'] - v['torch_cka']):.1e})"
            )
    mem = [
        run_fresh(
            "bench.similarity", "memory_run", {"pair": pair, "n": m, "bs": bs, "threads": threads, "device": device}
        )
        for m in mem_ns
    ]
    out["memory"] = mem
    out["peak_ratio"] = mem[1]["peak_rss_mb"] / mem[0]["peak_rss_mb"]
    out["rise_ratio"] = mem[1]["rise_mb"] / max(mem[0]["rise_mb"], 1e-9)
    print(
        f"[{pair}] peak RSS N={mem_ns[0]}: {mem[0]['peak_rss_mb']:.0f} MiB (rise {mem[0]['rise_mb']:.0f}), "
        f"N={mem_ns[1]}: {mem[1]['peak_rss_mb']:.0f} MiB (rise {mem[1]['rise_mb']:.0f}) -> "
        f"{out['peak_ratio']:.3f}x (target <= 1.2x)"
    )
    return out


def cost_only(pair: str, n: int, bs: int, repeats: int, device: str, threads: int) -> dict:
    """Just the cost ratio (tunelens over the forward passes) at another batch size."""
    from tunelens.analysis.measures.cka_models import cka_matrix

    a, b = _models(pair, device)
    batches = list(_Generated(pair, n, bs))

    def forward():
        with torch.no_grad():
            for x, _ in batches:
                a(x.to(device))
                b(x.to(device))

    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t = time_interleaved(
        {"forward_both": forward, "tunelens": lambda: cka_matrix(a, b, batches, device=device)},
        repeats=repeats,
        sync=sync,
    )
    key = "cpu_times" if threads == 1 and not device.startswith("cuda") else "times"
    r = paired_ratio(t, "tunelens", "forward_both", key)
    print(f"[{pair}] N={n} bs={bs}: tunelens / forward passes = {r:.3f}x ({key})")
    return {"batch_size": bs, "n_images": n, "ratio_basis": key, "ratio_tunelens_over_forward": r, "timings_s": t}


def default_stage(device: str, bs: int = 64) -> dict:
    """A default-run-sized CKA stage: base vs 3 tuned models (cka_matrix + cka_against_chance with scratch)."""
    from tunelens.analysis.measures.cka_models import cka_against_chance, cka_matrix
    from tunelens.finetune.data import ShapesSpec, make_shapes
    from tunelens.finetune.models import build_model, replace_head

    test = make_shapes(ShapesSpec(task="target", train_per_class=1, val_per_class=1, test_per_class=60))["test"]
    loader = torch.utils.data.DataLoader(test, batch_size=bs)
    base = replace_head(build_model("tiny_resnet", 8, seed=0), 6, seed=0)
    tuned = [build_model("tiny_resnet", 6, seed=s) for s in (1, 2, 3)]
    scratch = build_model("tiny_resnet", 6, seed=9)

    def stage():
        for t in tuned:
            cka_matrix(base, t, loader, device=device)
            cka_against_chance(base, t, loader, scratch=scratch, device=device)

    s, _ = timed(stage)
    print(
        f"[default stage] {len(tuned)} x (cka_matrix + cka_against_chance) on {len(test)} images: {s:.2f} s "
        "(target < 30 s)"
    )
    return {"seconds": s, "n_images": len(test), "n_tuned": len(tuned)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats (a smoke run)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default); 1 gives stable numbers on a shared machine",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=0)
    ap.add_argument("--pairs", default="resnet18,default")
    ap.add_argument("--batch-size", type=int, default=64, help="the default run's analysis batch size")
    ap.add_argument("--out", default="artifacts/bench/similarity.json")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads or None)
    cka_ok = importlib.util.find_spec("torch_cka") is not None
    if not cka_ok:
        print("torch-cka is not installed; skipping that comparison (pip install torch-cka, or make bench)")
    n = {"resnet18": 256 if args.quick else 512, "default": 512 if args.quick else 2048}
    repeats = args.repeats or (2 if args.quick else 3)
    mem_ns = (128, 512) if args.quick else (512, 4096)
    result = {
        "machine": machine_info(),
        "device": args.device,
        "quick": args.quick,
        "threads": threads,
        "memory_method": "peak RSS (ru_maxrss) of a fresh process per N; batches generated on the fly",
        "pairs": {},
    }
    for pair in args.pairs.split(","):
        result["pairs"][pair] = bench_pair(
            pair, n[pair], args.batch_size, repeats, args.device, mem_ns, threads, cka_ok
        )
        if pair == "default" and args.batch_size != 32:  # the Gram cost per image grows with the batch size
            result["pairs"][pair]["cost_at_batch_size_32"] = cost_only(pair, n[pair], 32, repeats, args.device, threads)
    result["default_stage"] = default_stage(args.device)
    path = write_json(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
