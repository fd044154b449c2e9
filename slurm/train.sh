#!/usr/bin/env bash
# Multi-node DDP training with `degsr fit`, one task per GPU.
#
#   sbatch [sbatch options] slurm/train.sh CONFIG... [key=value ...]
#   sbatch --nodes=2 slurm/train.sh configs/sr.yaml model.pretrained=/models/sd-turbo ...
#
# Edit (or override on the sbatch command line, which wins over the #SBATCH lines):
#   --nodes            nodes; passed on as trainer.num_nodes
#   --ntasks-per-node  GPUs per node (one task per GPU); passed on as trainer.devices
#   --gres=gpu:N       the same N as --ntasks-per-node
#   --cpus-per-task    CPU cores per GPU (DataLoader workers: data.num_workers < this)
#   --time             wall time; the job is signalled 90 s before it runs out
#   --partition/--account/--mem: your cluster's, if it needs them
# Submit from the repository root (config paths and the log files are relative to it).
#
# What the job does: `srun degsr fit trainer.num_nodes=<nodes> trainer.devices=<tasks per node>
# run.name=<job name>-<job id> "$@"`. The allocation's values come first, so a key you pass wins
# and `degsr fit` reports a mismatch with the allocation as one error line. run.name is added only
# when your key=value arguments have none (it wins over a run.name in a config file); it is keyed
# on the job id (array: <array job id>_<task id>), never on a time, so a requeued job (same id)
# resumes <run.dir>/<run.name>/checkpoints/last.ckpt. Set DEGSR_RUN_NAME (or pass run.name=...)
# to choose the name yourself, e.g. to continue an earlier job's run; in an array job it must hold
# ${oc.env:SLURM_ARRAY_TASK_ID} (resolved by degsr fit), or all tasks would share one run directory.
#
# Preemption/time limit: Slurm sends SIGUSR1 90 s before the end (--signal); degsr saves
# last.ckpt and requeues the job (--requeue), which restarts under the same job id and resumes.
# Send it by hand with `scancel --signal=USR1 JOBID` (all tasks of the job's steps get it).
#
# Environment: DEGSR_VENV=/path/to/venv is activated when set; otherwise `degsr` must be on the
# PATH (sbatch passes on the submitting shell's environment, so an activated venv works; not its
# MASTER_ADDR/MASTER_PORT: the job's first node is the rendezvous unless DEGSR_MASTER_ADDR/
# DEGSR_MASTER_PORT are set).
# W&B logs offline into the run directory unless logger.mode=online (or WANDB_MODE) says otherwise.
#
# Without GPUs (the CI cluster of .ci/slurm/up.sh):
#   sbatch --gres=none --cpus-per-task=1 --ntasks-per-node=2 slurm/train.sh \
#       configs/estimator_tiny.yaml trainer.accelerator=cpu trainer.strategy=ddp ...
#
#SBATCH --job-name=degsr-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
set -euo pipefail

die() { echo "train.sh: error: $*" >&2; exit 2; }

[ "$#" -gt 0 ] || die "no config given; usage: sbatch [sbatch options] slurm/train.sh CONFIG... [key=value ...]"
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job; submit it with sbatch"
[ -n "${SLURM_NTASKS_PER_NODE:-}" ] || die "--ntasks-per-node is not set (one task per GPU); do not override it with --ntasks"

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
  [ -z "${!v:-}" ] || echo "train.sh: ignoring $v=${!v} from the submitting shell (set DEGSR_$v to choose it)"
  unset "$v"
done

args=("trainer.num_nodes=$SLURM_JOB_NUM_NODES" "trainer.devices=$SLURM_NTASKS_PER_NODE")
name="${DEGSR_RUN_NAME:-${SLURM_JOB_NAME}-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}"
mine=${DEGSR_RUN_NAME:+DEGSR_RUN_NAME=$DEGSR_RUN_NAME}
for a in "$@"; do
  case "$a" in run.name=*|+run.name=*) name="" mine=$a ;; esac
done
# every task of an array gets the same arguments and environment: a fixed name would put them all
# in one run directory at once (a name with ${oc.env:SLURM_ARRAY_TASK_ID} is one per task)
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ -n "$mine" ] && [[ "$mine" != *SLURM_ARRAY_TASK_ID* ]]; then
  die "array task $SLURM_ARRAY_TASK_ID: $mine would be every task's run directory; leave it out (<job name>-<array job id>_<task id>) or put \${oc.env:SLURM_ARRAY_TASK_ID} in it"
fi
if [ -n "$name" ]; then args+=("run.name=$name"); fi

echo "train.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST:" \
     "$SLURM_JOB_NUM_NODES node(s) x $SLURM_NTASKS_PER_NODE task(s)${name:+, run.name=$name}"
exec srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  degsr fit "${args[@]}" "$@"
