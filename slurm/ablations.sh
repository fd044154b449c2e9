#!/usr/bin/env bash
# An ablation suite as a Slurm job array: task i trains BASE + the i-th override file of SUITE.
#
#   sbatch --array=0-4 slurm/ablations.sh experiments/ablations/sr.txt configs/sr.yaml \
#       model.pretrained=/models/sd-turbo sr.estimator=runs/estimator/export \
#       sr.lpips_vgg=/models/vgg16-397923af.pth disc.backbone=/models/dino-vitb16 \
#       data.train_shards='/data/shards/train-{000000..000999}.tar' data.val_folder=/data/val
#   sbatch --array=0-3 --ntasks-per-node=1 --gres=gpu:1 slurm/ablations.sh \
#       experiments/ablations/estimator.txt configs/estimator.yaml data.train_shards=... \
#       data.val_shards=...
#   degsr collect runs --out ablations.md          # when they are done: one markdown table
#
# SUITE lists one name of experiments/ablations/<name>.yaml per line (comments and blanks
# skipped; the file is looked up next to SUITE, then in experiments/ablations/ of the submit
# folder): --array=0-(lines - 1). Task i runs, with slurm/train.sh's conventions,
#   srun degsr fit trainer.num_nodes=<nodes> trainer.devices=<tasks per node> BASE... \
#       [key=value ...] experiments/ablations/<name>.yaml \
#       run.name=ablation-<suite>-<name>-<array job id>
# The run name holds the array job id, never a time: a requeued task (SIGUSR1 90 s before the
# time limit, --requeue) gets the same name and resumes its checkpoints. key=value overrides win
# over every file: don't override a key an ablation sets. Submit from the repository root (or
# give every path, SUITE's included, from the folder you submit in: runs/ and the logs go there);
# edit the #SBATCH lines or override them on the sbatch line (partition/account: your cluster's).
# Environment: DEGSR_VENV=/path/to/venv is activated when set; otherwise `degsr` must be on the
# PATH (sbatch passes on the submitting shell's environment, but not its MASTER_ADDR/MASTER_PORT:
# the job's first node is the rendezvous unless DEGSR_MASTER_ADDR/DEGSR_MASTER_PORT are set).
#SBATCH --job-name=degsr-ablation
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
#SBATCH --error=%x-%A_%a.err
#SBATCH --array=0-4
set -euo pipefail

die() { echo "ablations.sh: error: $*" >&2; exit 2; }

[ "$#" -ge 2 ] || die "usage: sbatch --array=0-N slurm/ablations.sh SUITE.txt BASE.yaml... [key=value ...]"
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job; submit it with sbatch"
suite=$1
shift
[ -f "$suite" ] || die "ablation list $suite: no such file"

mapfile -t names < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$suite" | grep -v '^$' || true)
[ "${#names[@]}" -gt 0 ] || die "$suite lists no ablations (one name of experiments/ablations/<name>.yaml per line)"
# a name listed twice gives two tasks one run.name: one run directory, trained in twice at once
dup=$(printf '%s\n' "${names[@]}" | sort | uniq -d)  # (no `| head`: SIGPIPE under pipefail)
[ -z "$dup" ] || die "$suite lists ${dup%%$'\n'*} twice: its tasks would share one run directory; list each ablation once"
task=${SLURM_ARRAY_TASK_ID:-0}
[ "$task" -lt "${#names[@]}" ] || \
    die "array task $task, but $suite lists ${#names[@]} ablations: submit with --array=0-$(( ${#names[@]} - 1 ))"
name=${names[$task]}
# next to the suite first: a suite given by its path from any folder works (the yaml's include:
# paths are relative to the yaml); else experiments/ablations/ here, for a suite of one's own
file="$(dirname "$suite")/$name.yaml"
[ -f "$file" ] || file="experiments/ablations/$name.yaml"
[ -f "$file" ] || die "$suite entry $task is $name, but neither $(dirname "$suite")/$name.yaml nor $file exists"

if [ -n "${DEGSR_VENV:-}" ]; then
  [ -f "$DEGSR_VENV/bin/activate" ] || die "DEGSR_VENV=$DEGSR_VENV has no bin/activate"
  # shellcheck disable=SC1091
  . "$DEGSR_VENV/bin/activate"
fi
command -v degsr >/dev/null || die "degsr is not on the PATH; activate its venv before sbatch or set DEGSR_VENV"
# A MASTER_ADDR/MASTER_PORT in the submitting shell (left by torchrun or an earlier job) reaches
# every task through sbatch's environment, and Lightning would rendezvous there instead of on the
# job's first node: drop them. DEGSR_MASTER_ADDR/DEGSR_MASTER_PORT choose them on purpose.
for v in MASTER_ADDR MASTER_PORT; do
  own=DEGSR_$v
  if [ -n "${!own:-}" ]; then export "$v=${!own}"; continue; fi
  [ -z "${!v:-}" ] || echo "ablations.sh: ignoring $v=${!v} from the submitting shell (set DEGSR_$v to choose it)"
  unset "$v"
done

run_name="ablation-$(basename "$suite" .txt)-$name-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}"
echo "ablations.sh: task $task of $suite: $file, run.name=$run_name," \
     "restart ${SLURM_RESTART_COUNT:-0}, ${SLURM_JOB_NUM_NODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-1} task(s)"
exec srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  degsr fit "trainer.num_nodes=${SLURM_JOB_NUM_NODES:-1}" "trainer.devices=${SLURM_NTASKS_PER_NODE:-1}" \
  "$@" "$file" "run.name=$run_name"
