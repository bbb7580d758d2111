"""Analysis throughput past one process: images per second of the CKA stage with 1 and 2 processes.

The CKA stage here is :func:`tunelens.analysis.measures.cka_models.cka_matrix` of a base and a tuned ``tiny_resnet``
(the default pair: 8 source classes with the head replaced for the 6 target classes, and a 6-class
model) over ``--n`` images of the default target data (generated shapes, 32x32), batch size 64 (the
default run's ``analysis.batch_size``), on ``--device``.

Each configuration runs in fresh processes started with ``torch.multiprocessing.spawn``; with more than
one process they form a ``torch.distributed`` group through :func:`finetune.runtime.init_distributed`
(the code path torchrun uses: ``gloo`` on CPU, ``nccl`` on CUDA), each rank reads its block of the
batches (:func:`tunelens.analysis.engine.sharding.shard_loader`) and ``StreamingCKA`` all-reduces its accumulators.
Per configuration: one warm-up call, then ``--repeats`` timed calls (ranks start together at a
barrier; a call's time is the slowest rank's); the median gives images per second. The 2-process
matrix is checked against the 1-process one (max abs difference).

Configurations: ``1 proc x T threads`` for T in ``--threads`` and ``P procs x 1 thread`` for P in
``--procs``. On a 2-core machine expect little gain from a second process (both cores are already
busy with one process of 2 threads); the figures are the baseline for a machine with more cores or
GPUs. Wall time on a shared machine mostly measures the neighbours, so each run also records the CPU time
of all ranks together (images per CPU-second): when it stays level from 1 to 2 processes, the sharding and
the all-reduce add little and wall-clock throughput scales with free cores. Writes
``artifacts/bench/scale.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench._common import machine_info, write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(n: int):
    from tunelens.finetune.data import ShapesSpec, make_shapes

    per_class = -(-n // 6)
    test = make_shapes(ShapesSpec(task="target", train_per_class=1, val_per_class=1, test_per_class=per_class))["test"]
    return torch.utils.data.Subset(test, range(min(n, len(test))))


def _models(device):
    from tunelens.finetune.models import build_model, replace_head

    base = replace_head(build_model("tiny_resnet", 8, seed=0), 6, seed=0).eval().to(device)
    tuned = build_model("tiny_resnet", 6, seed=1).eval().to(device)
    return base, tuned


def _worker(
    rank: int, world: int, threads: int, port: int, n: int, bs: int, repeats: int, device: str, out: str
) -> None:
    """One rank: time ``cka_matrix`` over this rank's batches; rank 0 writes timings and the matrix."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    from tunelens.analysis.engine.sharding import shard_loader
    from tunelens.analysis.measures.cka_models import cka_matrix
    from tunelens.core import runtime

    dev = runtime.init_distributed(device)
    try:
        data = _data(n)
        base, tuned = _models(dev)
        loader = shard_loader(data, bs, device=dev)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

        def once():
            runtime.barrier()
            sync()
            t, c = time.perf_counter(), time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = cka_matrix(base, tuned, loader, device=dev, n_examples=0, n_boot=200)
            sync()
            return time.perf_counter() - t, time.process_time() - c, r

        once()  # warm-up (allocations, first-call overheads)
        times, cpu, res = [], [], None
        for _ in range(repeats):
            t, c, res = once()
            parts = runtime.all_gather_objects((t, c))
            times.append(max(p[0] for p in parts))  # the stage ends when the slowest rank ends
            cpu.append(sum(p[1] for p in parts))  # CPU time of all ranks together
        if runtime.is_main():
            with open(out, "wb") as f:
                pickle.dump(
                    {
                        "times": times,
                        "cpu": cpu,
                        "ab": res.ab.to_numpy(),
                        "n_samples": res.n_samples,
                        "local_batches": len(loader),
                        "device": str(dev),
                        "backend": torch.distributed.get_backend() if runtime.is_distributed() else None,
                    },
                    f,
                )
    finally:
        if runtime.is_distributed():
            torch.distributed.destroy_process_group()


def run_config(procs: int, threads: int, n: int, bs: int, repeats: int, device: str) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pkl")
        mp.spawn(_worker, args=(procs, threads, _free_port(), n, bs, repeats, device, out), nprocs=procs, join=True)
        with open(out, "rb") as f:
            r = pickle.load(f)
    med = statistics.median(r["times"])
    cpu = statistics.median(r["cpu"])
    return {
        "processes": procs,
        "threads_per_process": threads,
        "seconds": r["times"],
        "median_s": med,
        "images_per_s": r["n_samples"] / med,
        "cpu_seconds_all_ranks": r["cpu"],
        "median_cpu_s": cpu,
        "images_per_cpu_s": r["n_samples"] / cpu,
        "n_images": r["n_samples"],
        "batches_rank0": r["local_batches"],
        "device": r["device"],
        "backend": r["backend"],
        "_ab": r["ab"],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="images (default 1024: 16 batches of 64)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--procs", default="2", help="process counts to run with 1 thread each (besides 1 process)")
    ap.add_argument("--threads", default="1,2", help="thread counts for the 1-process runs")
    ap.add_argument("--device", default="cpu", help="cpu, cuda (rank r on GPU r) or auto")
    ap.add_argument("--quick", action="store_true", help="256 images, 2 repeats (a smoke run)")
    ap.add_argument("--out", default="artifacts/bench/scale.json")
    args = ap.parse_args(argv)
    n, repeats = (256, 2) if args.quick else (args.n, args.repeats)
    procs = [int(p) for p in args.procs.split(",") if p.strip()]
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()):
        gpus = torch.cuda.device_count()
        skipped = [p for p in procs if p > gpus]
        if skipped:
            print(f"skipping {skipped} processes: only {gpus} GPU(s) (nccl needs one GPU per rank)")
        procs = [p for p in procs if p <= gpus]
    configs = [(1, t) for t in threads] + [(p, 1) for p in procs if p > 1]
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runs = []
    for p, t in configs:
        r = run_config(p, t, n, args.batch_size, repeats, args.device)
        runs.append(r)
        print(
            f"[scale] {p} process(es) x {t} thread(s) on {r['device']}: CKA stage over {r['n_images']} images "
            f"in {r['median_s']:.3f} s (median of {repeats}) -> {r['images_per_s']:.1f} images/s "
            f"({r['images_per_cpu_s']:.1f} images per CPU-second, all ranks)"
        )
    ref = next((r for r in runs if r["processes"] == 1 and r["threads_per_process"] == 1), runs[0])
    ref_ab = ref["_ab"]
    for r in runs:  # the sharded matrix equals the one-process matrix (float64 sums, all-reduced)
        r["max_abs_diff_vs_1_process"] = float(np.abs(r.pop("_ab") - ref_ab).max())
    result = {
        "machine": machine_info(),
        "device": args.device,
        "stage": "tunelens.analysis.measures.cka_models.cka_matrix, tiny_resnet base vs tuned, default target data (32x32)",
        "n_images": n,
        "batch_size": args.batch_size,
        "repeats": repeats,
        "loadavg_1m_at_start": load0,
        "runs": runs,
        "ratios": {},
    }
    for r in runs:
        key = f"{r['processes']}x{r['threads_per_process']}"
        result["ratios"][f"{key}_over_1x1"] = r["images_per_s"] / ref["images_per_s"]
    one2 = next((r for r in runs if r["processes"] == 1 and r["threads_per_process"] == 2), None)
    two1 = next((r for r in runs if r["processes"] == 2), None)
    if two1:
        print(
            f"[scale] 2 processes / 1 process (1 thread each): {two1['images_per_s'] / ref['images_per_s']:.2f}x "
            f"images/s; matrices agree to {two1['max_abs_diff_vs_1_process']:.1e}"
        )
        if one2:
            result["ratios"]["2x1_over_1x2"] = two1["images_per_s"] / one2["images_per_s"]
            print(
                f"[scale] 2 processes x 1 thread / 1 process x 2 threads: "
                f"{result['ratios']['2x1_over_1x2']:.2f}x images/s (same 2 cores)"
            )
    path = write_json(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
