"""Thread settings on a small CPU machine, idle and busy: one training step of the default ``tiny_resnet``
(batch 64, 32x32 shapes, forward + backward + SGD step), in seconds, under four settings:

* torch intra-op threads 1 or 2 (``torch.set_num_threads``);
* OpenMP's wait policy ``ACTIVE`` (libgomp's default: idle threads spin) or ``PASSIVE`` (they sleep).

Each setting is measured twice in fresh processes (the policy is read when OpenMP starts): once on an
otherwise idle machine, once next to one busy process (a single-threaded matrix-product loop, as another job
would be). Ratios are against "2 threads, PASSIVE, idle", the setting tunelens uses (``tunelens/__init__.py``
sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it).

On the 2-core project machine (measured 2026-11-29, see README "Timings"): with a busy neighbour, two spinning
threads fell off a cliff (0.75 s a step against 0.25 s with one thread or with PASSIVE); idle, PASSIVE costs
little against ACTIVE. Writes ``artifacts/bench/threads.json`` (``--out``).

    python bench/threads.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STEP = r"""
import sys, time, torch, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[1]))
from tunelens.finetune.models import build_model
torch.manual_seed(0)
m = build_model("tiny_resnet", 8, seed=0)
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 8, (64,))
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
def step():
    loss = F.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(int(sys.argv[2])):
    step()
print((time.perf_counter() - t) / int(sys.argv[2]))
"""

LOAD = r"""
import torch, time
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def measure(threads: int, policy: str, steps: int) -> float:
    env = dict(os.environ, OMP_WAIT_POLICY=policy)
    out = subprocess.run(
        [sys.executable, "-c", STEP, str(threads), str(steps)], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="artifacts/bench/threads.json")
    args = ap.parse_args(argv)
    settings = [(2, "PASSIVE"), (2, "ACTIVE"), (1, "PASSIVE"), (1, "ACTIVE")]
    rows = []
    for busy in (False, True):
        load = None
        if busy:
            load = subprocess.Popen([sys.executable, "-c", LOAD], env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
            time.sleep(2.0)
        try:
            for threads, policy in settings:
                s = measure(threads, policy, args.steps)
                rows.append({"busy_neighbour": busy, "threads": threads, "omp_wait_policy": policy, "step_s": s})
                print(f"{'busy' if busy else 'idle'}  threads={threads} {policy:7s}  {s:.3f} s/step", flush=True)
        finally:
            if load is not None:
                load.kill()
                load.wait()
    ref = next(
        r["step_s"] for r in rows if not r["busy_neighbour"] and r["threads"] == 2 and r["omp_wait_policy"] == "PASSIVE"
    )
    for r in rows:
        r["ratio_to_ours_idle"] = r["step_s"] / ref
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"load_before": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
