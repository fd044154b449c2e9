#!/usr/bin/env bash
# A W&B sweep on Slurm: a job array, each task one sweep agent that runs one configuration.
#
#   wandb sweep --entity ENTITY --project degsr experiments/sweeps/<spec>.yaml   # -> ENTITY/degsr/ID
#   sbatch --array=1-20%4 slurm/sweep.sh ENTITY/PROJECT/SWEEP_ID     # 20 runs, 4 at a time
#   SWEEP_ID=ENTITY/PROJECT/SWEEP_ID sbatch --array=1-20%4 slurm/sweep.sh   # the same
#
# Each task runs `wandb agent --count 1 SWEEP`: the agent asks the sweep for one configuration
# and starts the spec's command (`degsr fit ...`, from the submit directory: submit from the
# repository root) in this task -- one process, one GPU, no srun. Multi-GPU runs belong to
# slurm/train.sh. Edit --gres/--cpus-per-task/--time (or override them on the sbatch line).
#
# Sweeps need online W&B: the agent talks to the W&B server, and the sweep sees a run's metric
# only when it logs online (the specs in experiments/sweeps/ pass logger.mode=online). Log in
# first (`wandb login`, or WANDB_API_KEY in the environment); WANDB_MODE=offline breaks a sweep.
#
# Preemption/time limit: Slurm signals this batch shell (B:SIGUSR1) 90 s before the end; it passes
# SIGUSR1 on to the agent's run only (not to the agent, which would die of it), the run saves its
# checkpoint, marks itself preempting (W&B hands it to a later agent, which resumes it from its
# run directory) and requeues this task. Send it by hand with `scancel --batch --signal=USR1 JOB`.
# SIGTERM is how the agent stops a run the sweep's early termination (hyperband) dropped: the run
# saves its checkpoint and ends, not marked preempting, so the sweep does not hand it out again.
#
# Environment: DEGSR_VENV=/path/to/venv is activated when set; otherwise `degsr` and `wandb`
# must be on the PATH (sbatch passes on the submitting shell's environment).
#
#SBATCH --job-name=degsr-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
#SBATCH --error=%x-%A_%a.err
set -euo pipefail

die() { echo "sweep.sh: error: $*" >&2; exit 2; }

sweep="${1:-${SWEEP_ID:-}}"
[ -n "$sweep" ] || die "no sweep given; usage: sbatch --array=1-20%4 slurm/sweep.sh ENTITY/PROJECT/SWEEP_ID (or set SWEEP_ID)"
[ "$#" -le 1 ] || die "one argument (ENTITY/PROJECT/SWEEP_ID) expected, got $#: configuration comes from the sweep spec"
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job; submit it with sbatch"
[ "${SLURM_NTASKS:-1}" = 1 ] || die "one task per sweep agent (got --ntasks=$SLURM_NTASKS); use --array for more agents"
case "${WANDB_MODE:-online}" in online|run) ;; *)
  die "WANDB_MODE=$WANDB_MODE: a sweep agent needs online W&B (unset WANDB_MODE)" ;; esac

if [ -n "${DEGSR_VENV:-}" ]; then
  [ -f "$DEGSR_VENV/bin/activate" ] || die "DEGSR_VENV=$DEGSR_VENV has no bin/activate"
  # shellcheck disable=SC1091
  . "$DEGSR_VENV/bin/activate"
fi
command -v degsr >/dev/null || die "degsr is not on the PATH; activate its venv before sbatch or set DEGSR_VENV"
command -v wandb >/dev/null || die "wandb is not on the PATH; activate degsr's venv before sbatch or set DEGSR_VENV"

echo "sweep.sh: job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}" \
     "restart ${SLURM_RESTART_COUNT:-0}: wandb agent --count 1 $sweep"
wandb agent --count 1 "$sweep" &
agent=$!
# SIGUSR1 goes to the agent's children: the run it started (which saves and requeues this job)
# and, with wandb >= 0.18, its wandb-core service (a Go program: it ignores SIGUSR1).
trap 'pkill -USR1 -P "$agent" || true' USR1
while true; do
  if wait "$agent"; then status=0; else status=$?; fi  # returns early (> 128) when the trap ran
  kill -0 "$agent" 2>/dev/null || break
done
if [ "$status" -gt 128 ]; then  # the agent ended right after the trap: fetch its own status
  if wait "$agent" 2>/dev/null; then status=0; else status=$?; fi
fi
exit "$status"
