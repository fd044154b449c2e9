#!/usr/bin/env bash
# Super-resolve a test set with a stage-2 adapter on one GPU, then score it against ground truth.
#
#   sbatch slurm/eval.sh ADAPTER PRETRAINED INPUT GT_DIR OUT_DIR [degsr sr options] [-- degsr eval options]
#   sbatch slurm/eval.sh runs/sr-v1/export /models/sd-turbo /data/RealSR/LR /data/RealSR/HR \
#       out/realsr-sr-v1 --guidance 1.07 -- --crop-border 4 --lpips-vgg /models/vgg16-397923af.pth
#
#   ADAPTER     the stage-2 export of a run (<run.dir>/<run.name>/export, with adapter.json)
#   PRETRAINED  the base SD-Turbo diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
#   INPUT       the LR images: a folder, a file or a quoted glob
#   GT_DIR      the ground-truth HR images, paired with the outputs by file stem
#   OUT_DIR     <stem>.png per input, metrics.csv (per image) and summary.json (the eval summary)
#   options     after OUT_DIR go to `degsr sr` (--guidance, --blur/--noise, --tile, --precision,
#               --compile, --overwrite, ...); after a `--` they go to `degsr eval` (--crop-border,
#               --lpips-vgg). See `degsr sr --help` and `degsr eval --help`.
#
# Runs:  degsr sr --adapter ADAPTER --pretrained PRETRAINED INPUT --out OUT_DIR [sr options]
#        degsr eval --pred OUT_DIR --gt GT_DIR --json --allow-missing [eval options]  (-> OUT_DIR/summary.json)
# Finished outputs are skipped by `degsr sr`, so a rerun (or a requeue) continues where it stopped.
# Environment: DEGSR_VENV=/path/to/venv is activated when set; otherwise `degsr` must be on the PATH.
#
#SBATCH --job-name=degsr-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
set -euo pipefail

die() { echo "eval.sh: error: $*" >&2; exit 2; }

[ "$#" -ge 5 ] || die "need 5 arguments, got $#; usage: sbatch slurm/eval.sh ADAPTER PRETRAINED INPUT GT_DIR OUT_DIR [degsr sr options] [-- degsr eval options]"
adapter="$1" pretrained="$2" input="$3" gt="$4" out="$5"
shift 5
sr_opts=() eval_opts=()
while [ "$#" -gt 0 ]; do
  if [ "$1" = -- ]; then shift; eval_opts=("$@"); break; fi
  sr_opts+=("$1"); shift
done
[ -f "$adapter/adapter.json" ] || die "ADAPTER $adapter has no adapter.json (give a run's export folder)"
[ -d "$pretrained" ] || die "PRETRAINED $pretrained is not a folder (the base SD-Turbo diffusers folder)"
[ -d "$gt" ] || die "GT_DIR $gt is not a folder"

if [ -n "${DEGSR_VENV:-}" ]; then
  [ -f "$DEGSR_VENV/bin/activate" ] || die "DEGSR_VENV=$DEGSR_VENV has no bin/activate"
  # shellcheck disable=SC1091
  . "$DEGSR_VENV/bin/activate"
fi
command -v degsr >/dev/null || die "degsr is not on the PATH; activate its venv before sbatch or set DEGSR_VENV"

echo "eval.sh: job ${SLURM_JOB_ID:-none}: $input -> $out, scored against $gt"
# ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash < 4.4
sr_status=0  # degsr sr exits 1 when some inputs failed (one error line each): score the rest
degsr sr --adapter "$adapter" --pretrained "$pretrained" "$input" --out "$out" \
  ${sr_opts[@]+"${sr_opts[@]}"} || sr_status=$?
[ "$sr_status" -le 1 ] || exit "$sr_status"  # 2: bad options or adapter; else a crash
status=0  # degsr eval exits 1 when some pairs were skipped: keep the summary, report the status
degsr eval --pred "$out" --gt "$gt" --json --allow-missing ${eval_opts[@]+"${eval_opts[@]}"} \
  > "$out/summary.json.tmp" || status=$?
if [ -s "$out/summary.json.tmp" ]; then
  mv "$out/summary.json.tmp" "$out/summary.json"
  cat "$out/summary.json"
else
  rm -f "$out/summary.json.tmp"  # eval printed nothing (its error line is in the .err log)
fi
exit $(( status > sr_status ? status : sr_status ))
