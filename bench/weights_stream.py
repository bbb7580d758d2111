"""Benchmark of ``tunelens weights`` (the streaming weight audit) on Llama-shaped sharded bfloat16 pairs.

    python bench/weights_stream.py [--params 0.25e9 0.85e9] [--data DIR] [--threads N] [--no-intruders]
                                   [--out artifacts/bench/weights_stream.json]

For each size a pair is built once under ``--data`` (kept for reruns; a ``built.json`` marks it complete): a
Llama layout (hidden 2048, MLP 5632, vocabulary 32000, untied ``lm_head``, as many layers as the size needs),
bfloat16, sharded at about 500 MB per file with ``model.safetensors.index.json``. The tuned model is the base
plus a rank-8 update of relative size 1e-2 in every ``q_proj`` and ``v_proj``, Gaussian noise of 1e-3 times
the weights' standard deviation in the MLP matrices and ``lm_head``, and ``k_proj``, ``o_proj``, the norms and
the embeddings left bit-identical.

Each of these runs in a fresh process (seconds on a monotonic clock, peak RSS = the process's ``VmHWM``):

* ``audit``: ``tunelens weights --base B --tuned T --out O`` (results and report included);
* ``bare``: a loop that only reads every tensor pair (the audit's reader) and forms ``w1.float() - w0.float()``;
* ``load_both``: ``safetensors.torch.load_file`` of every shard of both models, then the same differences: run
  only where twice the pair's size fits in available memory;
* with ``--torchrun N``: ``torchrun --nproc_per_node N -m tunelens weights ...``, one thread per process (peak RSS:
  the largest of its processes).

The audit runs on ``--threads`` torch threads (default 1, the command's default: LAPACK's spin-waiting threads
make a busy machine far slower; use torchrun for more cores).

Reported per size: seconds and peak RSS of each, ``ratio_to_bare`` = audit / bare seconds and
``ratio_to_load_both`` = audit / load_both seconds, all measured in one run. Targets (2 CPU cores): the 0.85B pair
in at most 60 s with a peak RSS of at most 1.6 GB, and a peak that does not grow with the size.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._common import machine_info, run_fresh, write_json

HIDDEN, MLP, VOCAB = 2048, 5632, 32000
SHARD_BYTES = 500 * 10**6


def layer_count(params: float) -> int:
    """Layers of the Llama layout above that come closest to ``params`` parameters (at least one)."""
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN
    return max(1, round((params - 2 * VOCAB * HIDDEN - HIDDEN) / per_layer))


def _shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (MLP, HIDDEN)), (p + "mlp.up_proj.weight", (MLP, HIDDEN))]
        out += [(p + "mlp.down_proj.weight", (HIDDEN, MLP))]
        out += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
    return [*out, ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def _tuned(name: str, w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if name.endswith(("q_proj.weight", "v_proj.weight")):
        a = torch.randn(8, w.shape[1], generator=g)
        b = torch.randn(w.shape[0], 8, generator=g)
        d = b @ a
        d *= 1e-2 * float(w.float().norm()) / float(d.norm())
        return (w.float() + d).to(torch.bfloat16)
    if "mlp." in name or name.startswith("lm_head"):
        x = w.float()
        return (x + torch.randn(w.shape, generator=g) * (1e-3 * float(x.std()))).to(torch.bfloat16)
    return w.clone()


def build_pair(folder: Path, params: float, seed: int = 0) -> dict:
    """Write ``folder/base`` and ``folder/tuned`` (see the module docstring) unless already complete."""
    import torch
    from safetensors.torch import save_file

    layers = layer_count(params)
    marker = folder / "built.json"
    if marker.is_file() and json.loads(marker.read_text()).get("layers") == layers:
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    g = torch.Generator().manual_seed(seed)
    shapes = _shapes(layers)
    total = sum(math.prod(s) for _, s in shapes)
    n_shards = max(1, math.ceil(2 * total / SHARD_BYTES))
    maps: dict[str, dict[str, str]] = {"base": {}, "tuned": {}}
    cur: dict[str, dict] = {"base": {}, "tuned": {}}
    size, shard = 0, 1

    def flush() -> None:
        nonlocal size, shard
        for side in ("base", "tuned"):
            fname = f"model-{shard:05d}-of-{n_shards:05d}.safetensors"
            (folder / side).mkdir(parents=True, exist_ok=True)
            save_file(cur[side], str(folder / side / fname), metadata={"format": "pt"})
            maps[side].update(dict.fromkeys(cur[side], fname))
            cur[side] = {}
        size, shard = 0, shard + 1

    for name, shape in shapes:
        w = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        cur["base"][name], cur["tuned"][name] = w, _tuned(name, w, g)
        size += 2 * w.numel()
        if size >= SHARD_BYTES:
            flush()
    if cur["base"]:
        flush()
    for side in ("base", "tuned"):  # the real shard count in the names may be lower than the estimate: rename
        files = sorted((folder / side).glob("model-*.safetensors"))
        rename = {}
        for i, f in enumerate(files, 1):
            new = f"model-{i:05d}-of-{len(files):05d}.safetensors"
            f.rename(folder / side / new)
            rename[f.name] = new
        index = {"metadata": {"total_size": 2 * total}, "weight_map": {k: rename[v] for k, v in maps[side].items()}}
        (folder / side / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    info = {"params": total, "layers": layers, "bytes_per_model": 2 * total, "shards": shard - 1}
    marker.write_text(json.dumps(info))
    return info


def run_audit(base: str, tuned: str, threads: int, intruders: bool) -> dict:
    """``tunelens weights`` on the pair (in this process); seconds."""
    import torch

    from tunelens.weights_command import main

    torch.set_num_threads(threads)
    out = tempfile.mkdtemp(prefix="tunelens-bench-")
    try:
        t, c = time.perf_counter(), time.process_time()
        args = ["--base", base, "--tuned", tuned, "--out", f"{out}/o", "--device", "cpu", "--no-progress"]
        rc = main(args + ([] if intruders else ["--no-intruders"]))
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        assert rc == 0, rc
        import pandas as pd

        t_ = pd.read_csv(f"{out}/o/results/weight_deltas.csv")
        return {"seconds": seconds, "cpu_seconds": cpu, "tensors": len(t_), "identical": int(t_["identical"].sum())}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_torchrun(base: str, tuned: str, nproc: int, intruders: bool) -> dict:
    """``torchrun --nproc_per_node nproc -m tunelens weights`` (one thread per process) as a subprocess: seconds,
    and the largest peak RSS of its processes (``ru_maxrss`` of the waited-for children, torchrun's agent included)."""
    import os
    import resource
    import subprocess

    out = tempfile.mkdtemp(prefix="tunelens-bench-")
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "tunelens", "weights", "--base", base, "--tuned", tuned, "--out", f"{out}/o", "--device", "cpu"]
        cmd += ["--no-progress", "--threads", "1"] + ([] if intruders else ["--no-intruders"])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out)
        seconds = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        return {
            "seconds": seconds,
            "peak_rss_mb_per_process": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_bare(base: str, tuned: str, threads: int) -> dict:
    """Read every tensor pair with the audit's reader and form the float32 difference; seconds."""
    import torch

    from tunelens.analysis.io.tensor_pairing import pair_names
    from tunelens.analysis.io.tensor_stream import open_checkpoint

    torch.set_num_threads(threads)
    t = time.perf_counter()
    a, b = open_checkpoint(base), open_checkpoint(tuned)
    acc = 0.0
    for x, y in pair_names(a.names(), b.names()).pairs:
        d = b.read(y).float() - a.read(x).float()
        acc += float(d[0].sum())
    return {"seconds": time.perf_counter() - t, "check": acc}


def run_load_both(base: str, tuned: str, threads: int) -> dict:
    """Load both state dicts whole (every shard), then form the float32 differences; seconds."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    t = time.perf_counter()
    sds = [
        {k: v for f in sorted(Path(p).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        for p in (base, tuned)
    ]
    acc = 0.0
    for k, w0 in sds[0].items():
        acc += float((sds[1][k].float() - w0.float())[0].sum())
    return {"seconds": time.perf_counter() - t, "check": acc}


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, nargs="+", default=[0.25e9, 0.85e9])
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "tunelens-weights-stream"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-intruders", action="store_true")
    ap.add_argument("--skip-load-both", action="store_true")
    ap.add_argument("--torchrun", type=int, default=0, metavar="N", help="also time torchrun with N processes")
    ap.add_argument("--out", default="artifacts/bench/weights_stream.json")
    a = ap.parse_args()
    results = []
    for params in a.params:
        folder = Path(a.data) / f"llama-{params / 1e9:.2f}b"
        t = time.perf_counter()
        info = build_pair(folder, params)
        print(
            f"[bench] pair of {info['params'] / 1e9:.3f}B parameters ({info['layers']} layers) ready in "
            f"{time.perf_counter() - t:.0f}s: {folder}"
        )
        base, tuned = str(folder / "base"), str(folder / "tuned")
        row = {**info, "folder": str(folder)}
        row["audit"] = run_fresh(
            "bench.weights_stream",
            "run_audit",
            {"base": base, "tuned": tuned, "threads": a.threads, "intruders": not a.no_intruders},
        )
        print(
            f"[bench] audit: {row['audit']['seconds']:.1f}s ({row['audit']['cpu_seconds']:.1f}s CPU), peak RSS {row['audit']['peak_rss_mb']:.0f} MiB"
        )
        row["bare"] = run_fresh(
            "bench.weights_stream", "run_bare", {"base": base, "tuned": tuned, "threads": a.threads}
        )
        print(f"[bench] bare read+diff: {row['bare']['seconds']:.1f}s, peak RSS {row['bare']['peak_rss_mb']:.0f} MiB")
        row["ratio_to_bare"] = row["audit"]["seconds"] / row["bare"]["seconds"]
        if not a.skip_load_both and _available_bytes() > 2.5 * 2 * info["bytes_per_model"]:
            row["load_both"] = run_fresh(
                "bench.weights_stream", "run_load_both", {"base": base, "tuned": tuned, "threads": a.threads}
            )
            row["ratio_to_load_both"] = row["audit"]["seconds"] / row["load_both"]["seconds"]
            print(
                f"[bench] load both + diff: {row['load_both']['seconds']:.1f}s, peak RSS "
                f"{row['load_both']['peak_rss_mb']:.0f} MiB"
            )
        else:
            row["load_both"] = "skipped: does not fit in available memory" if not a.skip_load_both else "skipped"
        if a.torchrun:
            row["torchrun"] = run_fresh(
                "bench.weights_stream",
                "run_torchrun",
                {"base": base, "tuned": tuned, "nproc": a.torchrun, "intruders": not a.no_intruders},
            )
            row["torchrun"]["nproc"] = a.torchrun
            print(
                f"[bench] torchrun x{a.torchrun}: {row['torchrun']['seconds']:.1f}s, peak RSS per process "
                f"{row['torchrun']['peak_rss_mb_per_process']:.0f} MiB"
            )
        print(
            f"[bench] ratios: audit/bare {row['ratio_to_bare']:.2f}, audit/load_both {row.get('ratio_to_load_both', math.nan):.2f}"
        )
        results.append(row)
    out = write_json(
        a.out, {"machine": machine_info(), "threads": a.threads, "intruders": not a.no_intruders, "sizes": results}
    )
    print(f"[bench] wrote {out}")


if __name__ == "__main__":
    main()
