#!/usr/bin/env bash
# GPU check: on a machine with CUDA, run the default pipeline with --device cuda, the CKA benchmarks,
# `tunelens compare` on a resnet50 and a convnext_tiny pair at 224 px (bench/compare.py) and the CUDA tests,
# and print how long each took plus the peak GPU memory (training manifests, the analyses, each compare).
#
# Run from anywhere (it works in the repository root):  bash bench/gpu_check.sh
#   PYTHON=...   the interpreter (default .venv/bin/python)
#   OUT=...      output folder (default artifacts/gpu_check; removed first so every stage really runs)
#   QUICK=1      --quick pipeline and quick benchmarks (a smoke run)
#   DEVICE=cpu   a dry run of this script itself on a machine without a GPU (default DEVICE=cuda)
#   SIMILARITY_ARGS="..."  extra arguments for bench/similarity.py (e.g. "--pairs default")
# With 2+ GPUs it also runs the pipeline under torchrun, one process per GPU (nccl).
# Without a usable CUDA GPU it says so and exits with status 1; nothing else runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-artifacts/gpu_check}
QUICK=${QUICK:-0}
DEVICE=${DEVICE:-cuda}
read -r -a sim_args <<< "${SIMILARITY_ARGS:-}"

if [ "$DEVICE" != "cpu" ] && ! "$PYTHON" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    echo "gpu_check: no usable CUDA GPU ($PYTHON -c 'import torch; assert torch.cuda.is_available()' failed); nothing was run" >&2
    exit 1
fi
"$PYTHON" - <<'EOF'
import torch
print(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPU(s): "
      + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
if not torch.cuda.is_available():
    print("gpu_check: DEVICE=cpu -- a dry run of the script on the CPU, not a GPU check")
EOF
NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
[ "$DEVICE" != "cpu" ] || NGPU=0
quick=()
if [ "$QUICK" = "1" ]; then quick=(--quick); fi

rm -rf "$OUT"
mkdir -p "$OUT"
names=()
times=()
status=0
timed() {  # timed NAME COMMAND...: run, record wall seconds, keep going on failure (status remembered)
    local name=$1; shift
    echo "gpu_check: == $name: $*"
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    "$@" || rc=$?
    t1=$(date +%s.%N)
    names+=("$name$([ $rc -eq 0 ] || echo " (FAILED, exit $rc)")")
    times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')")
    [ $rc -eq 0 ] || status=$rc
}

timed "pipeline (tunelens run --device $DEVICE)" \
    "$PYTHON" -m tunelens run --device "$DEVICE" --out "$OUT/run" --no-progress "${quick[@]}"
if [ "$NGPU" -ge 2 ]; then
    timed "pipeline under torchrun, $NGPU processes" \
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" \
        -m tunelens run --device "$DEVICE" --out "$OUT/run_ddp" --no-progress "${quick[@]}"
fi
for arch in resnet50 convnext_tiny; do
    timed "tunelens compare, $arch pair at 224 px (bench/compare.py --device $DEVICE)" \
        "$PYTHON" bench/compare.py --arch "$arch" --device "$DEVICE" --out "$OUT/compare_${arch}_$DEVICE.json"
done
if [ "$DEVICE" != "cpu" ]; then
    timed "CUDA tests (pytest -k cuda)" "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/test_similarity.py
fi

timed "CKA benchmark (bench/similarity.py --device $DEVICE)" \
    "$PYTHON" bench/similarity.py --device "$DEVICE" --threads 0 --out "$OUT/bench_similarity.json" "${quick[@]}" "${sim_args[@]}"
procs=1
if [ "$NGPU" -ge 2 ]; then procs="$NGPU"; fi
timed "CKA stage throughput (bench/scale.py --device $DEVICE)" \
    "$PYTHON" bench/scale.py --device "$DEVICE" --threads 1 --procs "$procs" --out "$OUT/bench_scale.json" "${quick[@]}"

echo
echo "gpu_check: peak GPU memory (MiB) logged by the runs:"
"$PYTHON" - "$OUT" <<'EOF' || true
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = out / "run" / "results" / "summary.json"
if summary.exists():
    print(f"  run/analyses: {json.loads(summary.read_text()).get('analysis_peak_gpu_mem_mb')} MiB")
for res in sorted(out.glob("compare_*.json")):
    r = json.loads(res.read_text())
    print(f"  {res.stem}: {r.get('peak_gpu_mem_mb')} MiB; compare {r.get('total_s')} s, floor "
          f"{r.get('floor', {}).get('floor_s')} s, ratio {r.get('ratio')}")
for man in sorted(Path(sys.argv[1]).glob("*/checkpoints/*.json")):
    if man.name == "manifest.json":
        continue
    m = json.loads(man.read_text())
    print(f"  {man.parent.parent.name}/{man.stem}: {m.get('peak_gpu_mem_mb')} MiB, device {m.get('device')}, "
          f"world size {m.get('world_size')}, {m.get('seconds')} s training")
EOF
echo
echo "gpu_check: times (wall clock)"
for i in "${!names[@]}"; do
    printf "  %-60s %8s s\n" "${names[$i]}" "${times[$i]}"
done
exit $status
