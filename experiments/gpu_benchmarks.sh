#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run on one card: the engine, a stage-1 step, a
# stage-2 step at full size, inference eager + tiled + compiled (each benchmark in its own process,
# the baselines in the same run). Prints each benchmark's JSON and appends it to
# OUTDIR/results.jsonl (stderr, profiles included, to OUTDIR/log.txt).
#   experiments/gpu_benchmarks.sh [OUTDIR]
# Environment: PARTS (default "engine stage1 train infer compile"), STEP_S (each step's limit,
# default 240), COMPILE_S (the compiled step's, 420), COMPILE_BATCH (the compiled throughput
# figure's batch, default 16; 0 skips it), BASELINE (folders, space separated, each holding another
# degsr package, e.g. `git archive <rev> degsr configs | tar -x -C DIR`: their engines are timed
# too, each run from inside its folder, since `python -m` puts the working directory ahead of
# PYTHONPATH).
set -u
out=${1:-${OUT:-gpu-bench}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
parts=" ${PARTS:-engine stage1 train infer compile} "
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/log.txt"
bench() {
  echo "== ${PREFIX:-}degsr bench $*" | tee -a "$out/log.txt"
  local t0=$SECONDS
  if timeout "${STEP_S:-240}" python3 -m degsr bench "$@" --json >"$out/one.json" 2>>"$out/log.txt"; then
    cat "$out/one.json" | tee -a "$out/results.jsonl"
  else
    echo "   failed (rc $?); see log.txt" | tee -a "$out/log.txt"; tail -3 "$out/log.txt"
  fi
  echo "   ($((SECONDS - t0)) s)"
  rm -f "$out/one.json"
}
if [[ $parts == *" engine "* ]]; then
  # the first process on a fresh machine read 3x slower once (session 5): this one is not kept
  bench degradation --preset s3diff --size 512 --batch 64 --device cuda
  for base in ${BASELINE:-}; do
    (cd "$base" && PREFIX="[baseline $base] " \
      bench degradation --preset s3diff --size 512 --batch 64 --device cuda)
  done
  bench degradation --preset s3diff --size 512 --batch 64 --device cuda --profile
fi
[[ $parts == *" stage1 "* ]] && bench estimator --batch 32 --device cuda
if [[ $parts == *" train "* ]]; then
  bench train --arch sd-turbo --batch 4 --device cuda --steps 3
  bench train --arch sd-turbo --batch 4 --device cuda --steps 3 --gradient-checkpointing vae_decoder
fi
# 512 twice: the first pass warms cuDNN's algorithm choice, the second (kept) is the figure
[[ $parts == *" infer "* ]] && bench infer --arch sd-turbo --device cuda --sizes 512,512,1024 --batch 16 --tiled 4096 --mem-cap-gib 24
if [[ $parts == *" compile "* ]]; then
  STEP_S=${COMPILE_S:-420} bench infer --arch sd-turbo --device cuda --sizes 512 --batch "${COMPILE_BATCH:-16}" --compile
fi
true
