#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run on one card (about 4 minutes eager on an
# H200, plus the compiled run: over 230 s of compilation alone; SKIP_COMPILE=1 leaves it out):
# the engine, a stage-1 step, a stage-2 step at full size, inference eager + tiled + compiled.
# Prints each benchmark's JSON and appends it to OUTDIR/results.jsonl (errors to OUTDIR/log.txt).
#   experiments/gpu_benchmarks.sh [OUTDIR]      (each step is cut at $STEP_S seconds, default 240)
set -u
out=${1:-${OUT:-gpu-bench}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/log.txt"
bench() {
  echo "== degsr bench $*" | tee -a "$out/log.txt"
  local t0=$SECONDS
  if timeout "${STEP_S:-240}" python3 -m degsr bench "$@" --json >"$out/one.json" 2>>"$out/log.txt"; then
    cat "$out/one.json" | tee -a "$out/results.jsonl"
  else
    echo "   failed (rc $?); see log.txt" | tee -a "$out/log.txt"; tail -3 "$out/log.txt"
  fi
  echo "   ($((SECONDS - t0)) s)"
  rm -f "$out/one.json"
}
bench degradation --preset s3diff --size 512 --batch 64 --device cuda
bench degradation --preset s3diff --size 512 --batch 16 --device cuda
bench estimator --batch 32 --device cuda
bench train --arch sd-turbo --batch 4 --device cuda --steps 3
bench train --arch sd-turbo --batch 4 --device cuda --steps 3 --gradient-checkpointing vae_decoder
bench train --arch sd-turbo --batch 4 --device cuda --steps 3 --gradient-checkpointing
# 512 twice: the first pass warms cuDNN's algorithm choice, the second (kept) is the figure
bench infer --arch sd-turbo --device cuda --sizes 512,512,1024 --batch 16 --tiled 4096 --mem-cap-gib 24
[ -n "${SKIP_COMPILE:-}" ] || STEP_S=${COMPILE_S:-500} bench infer --arch sd-turbo --device cuda --sizes 512 --batch 0 --compile
