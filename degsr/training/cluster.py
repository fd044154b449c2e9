"""Slurm: the allocation check before any work, and preemption (SIGUSR1) handled at a step boundary.

``#SBATCH --signal=SIGUSR1@90`` makes Slurm send SIGUSR1 to every task 90 s before the time
limit. Lightning's own handler saves ``hpc_ckpt_N.ckpt`` from inside the signal handler -- in the
middle of whatever the process was doing, with collectives that can deadlock under DDP -- so it
is turned off (``SLURMEnvironment(auto_requeue=False)``) and :class:`Preemption` does instead:
the handler only sets a flag; after the next optimiser step the ranks all-reduce it, all save
``checkpoints/last.ckpt`` (that is, the state between two steps, which resumes exactly) and
training stops without an export. Only when ``fit`` has returned and the process group is gone
does rank 0 run ``scontrol requeue`` (:func:`requeue`): Slurm sends SIGTERM to the job's tasks
at once, so nothing may be left to do by then. Outside Slurm SIGUSR1 saves and stops the same
way (rerun the command to resume).

SIGTERM (``kill``, ``docker stop``, a Kubernetes pod ending, a Slurm preemption without
``--signal``) takes the same path once training runs: Lightning's own handler forwards the signal
to the other ranks and broadcasts from inside the handler, which under DDP met another rank's
collective (a hang, or a crash with nothing saved, when the signal came to the launching process
alone during validation). From the sanity check on, :class:`Preemption` owns SIGTERM: its handler
forwards it to the ranks this process launched and sets a flag, the flag is all-reduced like
SIGUSR1's, the ranks save together, and only then is Lightning's flag set, on every rank at once,
so that it stops the run (status 143) at the same point everywhere.

A validation pass can outlast the warning window, so a signal that comes during one ends it at
the next validation batch instead (the ranks all-reduce the flag after each batch but the last
of the rank with the fewest); the pass logs nothing, and the checkpoint, saved when Lightning has
closed the pass (the weight average swapped out again), holds the state of the step it came
after: the resumed run validates that step again, whole, and trains on as if never stopped. A
signal in the last batch (no cut there) is acted on at the end of the pass, which is then whole
and logged, and not run again.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, Timer
from omegaconf import DictConfig

from degsr import console
from degsr.errors import UserError


def under_slurm() -> bool:
    """A task started by ``srun``/``sbatch`` (not an interactive ``--job-name=bash`` shell)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def _count(name: str) -> int | None:
    """Slurm's per-node counts look like ``2`` or ``2(x3)``; the leading number."""
    m = re.match(r"\d+", os.environ.get(name, ""))
    return int(m.group()) if m else None


def check_allocation(cfg: DictConfig) -> None:
    """Under Slurm, trainer.devices/num_nodes must describe the allocation; everywhere, a GPU
    config needs a GPU (UserError if not)."""
    t = cfg.trainer
    slurm = under_slurm()
    if slurm:
        per_node, nodes, tasks = (_count(n) for n in ("SLURM_NTASKS_PER_NODE",
                                                     "SLURM_JOB_NUM_NODES", "SLURM_NTASKS"))
        if per_node is not None and t.devices != per_node:
            raise UserError(f"trainer.devices={t.devices} but the Slurm allocation has "
                            f"--ntasks-per-node={per_node}: one task per device, set "
                            f"trainer.devices={per_node} (slurm/train.sh passes it)")
        if nodes is not None and t.num_nodes != nodes:
            raise UserError(f"trainer.num_nodes={t.num_nodes} but the Slurm allocation has "
                            f"--nodes={nodes}: set trainer.num_nodes={nodes}")
        if tasks is not None and t.devices * t.num_nodes != tasks:
            raise UserError(f"trainer.devices x trainer.num_nodes = {t.devices * t.num_nodes} but "
                            f"Slurm started {tasks} tasks (--ntasks); use --ntasks-per-node and "
                            "--nodes")
    if t.accelerator in ("gpu", "cuda") and torch.cuda.device_count() < 1:
        fix = (f"request them with --gres=gpu:{t.devices}" if slurm else
               "set trainer.accelerator=cpu (or auto), or use the *_tiny.yaml configs on a CPU")
        raise UserError(f"trainer.accelerator={t.accelerator} but "
                        f"{'this Slurm task sees' if slurm else 'this machine has'} no GPU: {fix}")


def requeue() -> bool:
    """``scontrol requeue`` this job (array task aware); False when that failed."""
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    try:
        r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        console.log.error(f"scontrol requeue {job_id} failed: {e}")
        return False
    if r.returncode:
        console.log.error(f"scontrol requeue {job_id} failed: {r.stderr.strip()}")
    return r.returncode == 0


class Preemption(Callback):
    """SIGUSR1 -> save ``ckpt_path`` after the current step on every rank, requeue, stop.
    SIGTERM that came during a step -> the same save, then Lightning's stop (exit 143).
    Either during a validation pass in fit -> the pass ends at the next batch, then the same."""

    def __init__(self, ckpt_path: Path, on_preempt=None, signum: int = signal.SIGUSR1):
        self.ckpt_path, self.on_preempt, self.signum = Path(ckpt_path), on_preempt, signum
        self.requested = False
        self.terminated = False  # SIGTERM came while we owned it (_own_sigterm)
        self._children = []  # the ranks this process launched (rank 0 of Lightning's DDP)
        self.preempted = False
        self._previous, self._armed = None, False
        self._signal = "SIGTERM"  # the signal acted on (:meth:`_asked`)
        self._cut = False  # this validation pass was ended early: on_validation_end saves
        self._common_val_batches = 0.0  # batches of this pass that every rank runs

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def _term_handler(self, signum, frame) -> None:
        """A flag and the signal passed on to the ranks launched here; no collective, no log:
        the main thread may be inside either."""
        if not self.terminated:
            for proc in self._children:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)
        self.terminated = True

    def _own_sigterm(self, trainer) -> None:
        """Replace Lightning's SIGTERM handler (registered just before the run stage, after
        on_fit_start) with :meth:`_term_handler`; Lightning's teardown restores what it found."""
        if (signal.getsignal(signal.SIGTERM) != self._term_handler
                and threading.current_thread() is threading.main_thread()):
            self._children = list(getattr(trainer.strategy.launcher, "procs", None) or [])
            signal.signal(signal.SIGTERM, self._term_handler)

    def arm(self) -> None:
        """Catch the signal from now on (``degsr fit`` arms before it builds the models: until
        then SIGUSR1 would end the process). Idempotent."""
        if not self._armed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)
            self._armed = True

    def disarm(self) -> None:
        """Hand the signal back; also when our handler came back after a first disarm:
        Lightning's signal connector restores at its teardown what it found at fit start, ours
        when we armed before it."""
        self._armed = False
        if (self._previous is not None and threading.current_thread() is threading.main_thread()
                and signal.getsignal(self.signum) == self._handler):
            signal.signal(self.signum, self._previous)

    def on_fit_start(self, trainer, module) -> None:
        self.arm()

    def on_sanity_check_start(self, trainer, module) -> None:
        self._own_sigterm(trainer)

    def on_train_start(self, trainer, module) -> None:
        self._own_sigterm(trainer)

    def on_fit_end(self, trainer, module) -> None:
        self.disarm()

    def on_exception(self, trainer, module, exception) -> None:
        self.disarm()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.preempted or not _at_step_boundary(trainer, module, batch_idx):
            return
        # SIGTERM (kill, a Slurm preemption that sends no --signal): Lightning raises at the end
        # of this step; save first, as for SIGUSR1, when it came before this hook
        if self._asked(trainer):
            self._save_and_stop(trainer)

    def on_validation_start(self, trainer, module) -> None:
        self._cut = False
        # a pass run again at a resume still counts the first batch begun in the epoch's totals
        # (_validate_again_on_resume): even them out, or a later checkpoint saved at a
        # validation step would look like one saved mid-validation too
        total = trainer.fit_loop.epoch_loop.val_loop.batch_progress.total
        total.ready = total.started = total.processed = total.completed
        n = float(sum(trainer.num_val_batches))  # (EvenSplit gives every rank as many)
        if trainer.world_size > 1:  # a collective per pass, on every rank
            n = float(trainer.strategy.reduce(torch.tensor(n, device=trainer.strategy.root_device),
                                              reduce_op="min"))
        self._common_val_batches = n

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
        if (not self._may_end(trainer, module)
                # every rank is here, and none at its last batch (all-reduce below)
                or progress.current.ready >= self._common_val_batches
                or not self._asked(trainer)):
            return
        self._cut = True
        discard = getattr(module, "discard_validation", None)
        if discard is not None:
            discard()  # the pass logs nothing: its metrics would be those of a part of the set
        # Lightning's evaluation loop takes this as the end of the pass (before its own SIGTERM
        # check, which would raise here without saving): the end hooks run, then ours below
        raise StopIteration

    def on_validation_end(self, trainer, module) -> None:
        if self._cut:
            _validate_again_on_resume(trainer.fit_loop.epoch_loop.val_loop.batch_progress)
            self._save_and_stop(trainer)
        elif self._may_end(trainer, module) and self._asked(trainer):
            # a signal in the pass's last batch (not cut: the pass is whole and logged), or in a
            # pass of one batch: save its end now, before Lightning's own SIGTERM check raises
            self._save_and_stop(trainer)

    def _may_end(self, trainer, module) -> bool:
        """Whether a signal may end this validation pass: one in fit, after a whole step, and not
        the sanity check or the final validation (whose step is in last.ckpt already)."""
        return not (self.preempted or trainer.state.fn != "fit" or trainer.sanity_checking
                    or trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
                    or not _at_step_boundary(trainer, module,
                                             trainer.fit_loop.epoch_loop.batch_idx))

    def _asked(self, trainer) -> bool:
        """Whether SIGUSR1 or SIGTERM came, on any rank (a collective when there are several).
        Every rank then names the same signal: SIGUSR1 (requeue) if any rank got it."""
        flags = [float(self.requested),
                 float(self.terminated or bool(getattr(trainer, "received_sigterm", False)))]
        if trainer.world_size > 1:  # all ranks must agree; alone, the flags need no device sync
            both = torch.tensor(flags, device=trainer.strategy.root_device)
            flags = trainer.strategy.reduce(both, reduce_op="sum").tolist()
        self._signal = "SIGUSR1" if flags[0] > 0 else "SIGTERM"
        return max(flags) > 0

    def _save_and_stop(self, trainer) -> None:
        trainer.save_checkpoint(self.ckpt_path)  # every rank takes part; rank 0 writes
        for cb in trainer.checkpoint_callbacks:  # ModelCheckpoint must not re-save last.ckpt at
            cb._last_global_step_saved = trainer.global_step  # the forced epoch/train end that
            cb._last_checkpoint_saved = str(self.ckpt_path)  # follows: that would not resume exactly
        self.preempted = True
        name = self._signal
        requeue = under_slurm() and name == "SIGUSR1"
        if trainer.is_global_zero:
            console.log.warning(f"{name}: saved {self.ckpt_path} at step {trainer.global_step}"
                                + (" (its validation is run again at the resume)" if self._cut
                                   else "") + "; "
                                + ("the job is requeued when this process is done" if requeue
                                   else "rerun the command to resume"))
        if self.on_preempt is not None:
            self.on_preempt(trainer, requeue, name)
        trainer.should_stop = True
        if name == "SIGTERM":  # every rank at once: Lightning stops the run (SIGTERMException)
            trainer._signal_connector.received_sigterm = True  # at the same point on each
        # Lightning validates when a run is stopped early; a preempted run must exit (and
        # requeue) within Slurm's warning window, so no validation pass runs after the save
        trainer.fit_loop.epoch_loop._should_check_val_fx = lambda *args, **kwargs: False


def _validate_again_on_resume(progress) -> None:
    """Set a validation pass cut after batch j (Lightning's counts: ready = started = processed =
    completed + 1 = j + 1) to a pass stopped inside its first step (ready = started = 1,
    processed = completed = 0; the totals over the epoch likewise): resumed from a checkpoint
    with those, Lightning runs the pass again, from its first batch, before the next training
    step (its "restarted mid-evaluation"). Left as they are, Lightning takes the pass for one
    that ended (a checkpoint saved at its end) and skips it: the step's validation would be
    missing. :meth:`Preemption.on_validation_start` evens the totals out in the pass run again."""
    done = progress.current.completed
    for counts in (progress.total, progress.current):
        counts.completed = counts.processed = counts.completed - done
        counts.ready = counts.started = counts.completed + 1
    progress.is_last_batch = False


def _at_step_boundary(trainer, module, batch_idx: int) -> bool:
    """No gradient accumulation in flight after this batch (a checkpoint now resumes exactly)."""
    if module.automatic_optimization:
        accumulate = trainer.accumulate_grad_batches
    else:
        accumulate = getattr(getattr(module, "cfg", None), "accumulate", 1)
    return (batch_idx + 1) % max(1, int(accumulate)) == 0


class StepTimer(Timer):
    """Lightning's Timer (``trainer.max_minutes``, counted over a run's attempts), checked only
    after an optimizer step: stopped mid-accumulation, a run ended where no checkpoint is
    saved, and exported weights that its ``last.ckpt`` did not hold. Saved under Timer's key."""

    @property
    def state_key(self) -> str:
        return "Timer"

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if _at_step_boundary(trainer, module, batch_idx):
            super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
