#!/usr/bin/env bash
# The GPU figures of issue 8 in one prepared run: < 8 minutes on one H100/H200 (80+ GB).
#
#     bash benchmarks/gpu_reference.sh [OUT_DIR]          # OUT_DIR default: $OUT, else results/bench-gpu
#
# Steps, in priority order, each with what is left of an overall budget (BUDGET_S, default 470 s), each
# skipped when too little is left:
#   1. reference (SD3.5-medium architecture, random weights, 512 px, 32 images/iteration, 10 steps, 9 trained,
#      CFG 4.5, LoRA r=32, KL 0.04, EMA), bf16, eager: 1 warm-up + 2 measured GRPO iterations -> phase
#      breakdown, overhead ratio, images/s, TFLOP/s, MFU, memory per phase; then the training micro-batch
#      memory sweep (how large a micro-batch fits in 80 GB)                                     (~150 s)
#   2. Z-Image architecture (6.2 B) at 512 px: the transformer alone, forward and forward+backward (~60 s)
#   3. the reference again with torch.compile (regional: each repeated block, ~3 graphs per block type):
#      1 warm-up iteration (compiles) + 1 measured iteration
# Every figure is a JSON line in OUT_DIR/gpu_figures.jsonl; the readable tables go to OUT_DIR/*.log and stdout.
# DEVICE=cpu QUICK=1 runs the same steps on a CPU at smoke-test sizes (checks the script, not the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-results/bench-gpu}}
BUDGET_S=${BUDGET_S:-470}
DEVICE=${DEVICE:-cuda}
QUICK_ARG=${QUICK:+--quick}
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PORTRAITGEN_CACHE=${PORTRAITGEN_CACHE:-$OUT_DIR/cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT_DIR/inductor-cache}
mkdir -p "$OUT_DIR"
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

DEVICE=$DEVICE "$PY" - <<'EOF' || { echo "missing dependencies or no CUDA device" >&2; exit 2; }
import os
import torch, diffusers, peft, accelerate  # noqa: F401
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.cuda.get_device_name()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null | tee "$OUT_DIR/gpu.txt"

step() {  # step NAME MIN_SECONDS ARGS...
  local name=$1 need=$2; shift 2
  local budget; budget=$(left)
  if (( budget < need )); then
    echo "{\"bench\": \"gpu_reference\", \"name\": \"$name\", \"value\": null, \"note\": \"skipped: ${budget}s left\"}" \
      | tee -a "$OUT_DIR/gpu_figures.jsonl"
    return
  fi
  echo "=== $name (budget ${budget}s) ==="
  timeout --signal=INT --kill-after=10 "$budget" "$PY" benchmarks/iteration_breakdown.py --device "$DEVICE" $QUICK_ARG "$@" \
    2>"$OUT_DIR/$name.err" | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  grep '^{' "$OUT_DIR/$name.log" >> "$OUT_DIR/gpu_figures.jsonl"
  if (( rc != 0 )); then
    echo "{\"bench\": \"gpu_reference\", \"name\": \"$name\", \"value\": null, \"note\": \"exit $rc\"}" \
      | tee -a "$OUT_DIR/gpu_figures.jsonl"
    tail -n 20 "$OUT_DIR/$name.err"
  fi
}

: > "$OUT_DIR/gpu_figures.jsonl"
step reference_eager 120 --config reference --warmup 1 --iterations 2 --memory-sweep
step zimage_transformer 45 --config zimage --transformer-only --repeats 3
step reference_compile 150 --config reference --compile --warmup 1 --iterations 1 --repeats 2

echo "=== summary ($(( $(date +%s) - START ))s) ==="
"$PY" - "$OUT_DIR/gpu_figures.jsonl" <<'EOF'
import json, sys
keys = ("overhead_ratio", "images_per_second", "achieved_tflops", "mfu", "iteration_wall", "gpu_peak_allocated",
        "max_micro_batch_80gb", "gib_per_sample", "forward/ms_per_image", "forward_backward/ms_per_image",
        "forward/tflops", "forward_backward/tflops", "forward/mfu", "forward_backward/mfu")
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("name") in keys or r.get("value") is None:
        tag = f"{r.get('bench')}:{r.get('config', '')}{' compile' if r.get('compile') else ''}"
        print(f"{tag:<42} {r['name']:<32} {r.get('value')} {r.get('unit', '')} {r.get('note', '')}")
EOF
