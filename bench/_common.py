"""Small helpers shared by the benchmarks: timing, peak memory in a fresh process, JSON output.

Memory is measured as the operating system sees it (resident set size), because tracemalloc does
not see torch's allocations. A peak is only meaningful in a fresh process, so
:func:`run_fresh` runs a function of a benchmark module in a new interpreter and returns what it
returned (JSON), together with that process's peak RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

__all__ = [
    "ROOT",
    "machine_info",
    "paired_ratio",
    "peak_rss_mb",
    "rss_mb",
    "run_fresh",
    "set_threads",
    "time_interleaved",
    "timed",
    "write_json",
]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call, on a monotonic clock."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int = 3, warmup: int = 1, sync: Callable[[], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Time several functions alternately (A B C A B C ...), so slow drifts of a shared machine hit all
    of them alike. Per name: wall-clock ``times``/``median``/``min`` and process CPU time ``cpu_times``/
    ``cpu_median`` (with one thread, CPU time is the cost even when other jobs share the cores)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if sync:
                sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            if sync:
                sync()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {
        k: {
            "times": wall[k],
            "median": statistics.median(wall[k]),
            "min": min(wall[k]),
            "cpu_times": cpu[k],
            "cpu_median": statistics.median(cpu[k]),
        }
        for k in fns
    }


def paired_ratio(t: dict[str, dict[str, Any]], num: str, den: str, key: str = "times") -> float:
    """Median over repeats of ``t[num][key][i] / t[den][key][i]`` (pairs timed back to back)."""
    return statistics.median(a / b for a, b in zip(t[num][key], t[den][key], strict=False))


def rss_mb() -> float:
    """Current resident set size of this process, MiB (Linux ``/proc``; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of *this* address space. (``ru_maxrss``
    is not used there: it survives ``fork`` + ``exec``, so a child started from a big parent reports the
    parent's size.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run_fresh(
    module: str, func: str, kwargs: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 1800
) -> dict[str, Any]:
    """Run ``module.func(**kwargs)`` in a new Python process (repository root on the path) and return its
    JSON-serialisable result, with ``peak_rss_mb`` of that process added."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"from {module} import {func} as f\n"
        "from bench._common import peak_rss_mb\n"
        f"out = f(**json.loads({json.dumps(json.dumps(kwargs))}))\n"
        "out['peak_rss_mb'] = peak_rss_mb()\n"
        "print('@@RESULT@@' + json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=str(ROOT),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module}.{func} failed in a fresh process:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")][-1]
    return json.loads(line[len("@@RESULT@@") :])


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (None: leave as is); return the number in use."""
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def machine_info() -> dict[str, Any]:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = os.getloadavg()[0]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON (parent folders created); return the path."""
    p = Path(path)
    if not p.is_absolute():
        p = ROOT / p
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return p
