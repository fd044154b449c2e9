"""``degsr fit``: build the stage's LightningModule, the DataModule, logger and Trainer; train;
export.

The run directory is ``<run.dir>/<run.name>`` (no timestamp; under a W&B sweep agent the run name
gets the agent's ``WANDB_RUN_ID`` appended): a rerun or a requeued job with the same name resumes
from the newest complete checkpoint in ``checkpoints/`` (damaged ones are skipped with a message),
and logs into the same W&B run. Resuming is exact: model, optimisers, step counters, data stream
position and every random draw continue as if the run had not stopped (see
:mod:`degsr.data.module`, :func:`degsr.seeding.batch_generator`).
One fit at a time trains a run directory (:class:`degsr.training.runlock.RunLock`): a second one
started meanwhile is a one-line error.

Besides checkpoints, logs and the export, rank 0 writes ``events.jsonl`` and, when training
ends, ``final.json`` that ``degsr collect`` reads (:mod:`degsr.training.runlog`).
"""

from __future__ import annotations

import datetime
import os
import signal
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from degsr import console
from degsr.config import flatten, save_config
from degsr.errors import UserError
from degsr.training.checkpoints import (AtomicCheckpointIO, RunCheckpoint, checkpoint_step,
                                       find_resume, is_lightning, remove_stale_temps)
from degsr.training.cluster import Preemption, StepTimer, check_allocation, requeue, under_slurm
from degsr.training.runlog import RunLog, append_event, ended_metrics, final_metrics
from degsr.training.runlock import RunLock, global_rank_zero
from degsr.training.tracking import finish_wandb, make_logger, run_dir


def build_module(cfg: DictConfig) -> L.LightningModule:
    skips = cfg.trainer.max_nonfinite_skips
    if cfg.stage == "estimator":
        from degsr.estimator.module import EstimatorModule
        return EstimatorModule(cfg.estimator, cfg.degradation, seed=cfg.run.seed,
                               max_nonfinite_skips=skips)
    if cfg.stage == "sr":
        from degsr.sr.module import SRModule
        return SRModule(cfg.model, cfg.lora, cfg.disc, cfg.sr, cfg.degradation, seed=cfg.run.seed,
                        images_every_n_steps=cfg.logger.images_every_n_steps,
                        max_nonfinite_skips=skips)
    raise ValueError(f"unknown stage {cfg.stage}")  # the schema's choice() rules this out


class SeedEachBatch(Callback):
    """Reseeds torch's, numpy's and Python's global generators before every training batch
    from (run.seed, rank, batch index): anything drawing from them (dropout, a library's
    unseeded noise) then draws the same in a resumed run as in an uninterrupted one."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        import random

        import numpy as np

        from degsr.seeding import derive_seed

        s = derive_seed(self.seed, 5000 + trainer.global_rank,
                        trainer.fit_loop.epoch_loop.total_batch_idx)
        torch.manual_seed(s)  # CPU and every CUDA device
        np.random.seed(s % 2**32)
        random.seed(s)


class DataQualityLog(Callback):
    """Logs the DataModule's counts of samples read / corrupt / too small (``data/*``)."""

    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "data_quality") and trainer.global_step % self.every == 0:
            module.log_dict({f"data/{k}": float(v) for k, v in dm.data_quality().items()})


class ValidateTheLastStep(Callback):
    """A validation at the step training ends on (``trainer.max_steps``), a multiple of
    ``trainer.val_every_n_steps`` or not: ``final.json``'s metrics are then the exported
    weights' own. Lightning validates a step at which training is asked to stop (as the time
    limit does)."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def make_trainer(cfg: DictConfig, root: Path, logger, extra_callbacks=()) -> L.Trainer:
    t = cfg.trainer
    console.quiet_lightning()
    ckpt = RunCheckpoint(dirpath=str(root / "checkpoints"), every_n_train_steps=t.checkpoint_every_n_steps,
                         save_last=True, save_top_k=t.keep_last_n, filename="step{step:07d}",
                         auto_insert_metric_name=False,
                         enable_version_counter=False)  # one run dir per run: overwrite last
    callbacks = [ckpt, DataQualityLog(t.log_every_n_steps), SeedEachBatch(cfg.run.seed),
                 ValidateTheLastStep()]
    if cfg.stage == "estimator" and cfg.estimator.ema_decay > 0:  # before RunLog: it swaps the
        from lightning.pytorch.callbacks import EMAWeightAveraging  # average in, then RunLog exports

        callbacks.append(EMAWeightAveraging(decay=cfg.estimator.ema_decay))
    callbacks += extra_callbacks
    if t.max_minutes:
        callbacks.append(StepTimer(datetime.timedelta(minutes=t.max_minutes)))
    if cfg.logger.wandb:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    plugins = [AtomicCheckpointIO()]
    if under_slurm():
        from lightning.pytorch.plugins.environments import SLURMEnvironment
        plugins.append(SLURMEnvironment(auto_requeue=False))  # Preemption does it between steps
    strategy = t.strategy  # stage sr: the generator and discriminator steps each leave the
    if cfg.stage == "sr" and strategy == "auto" and t.devices * t.num_nodes > 1:  # other's
        strategy = "ddp_find_unused_parameters_true"  # parameters without gradients
    # validation and logging every N optimizer steps; Lightning counts training batches for
    # both in stage sr (manual optimisation), for validation in stage estimator
    per_step = cfg.sr.accumulate if cfg.stage == "sr" else t.accumulate_grad_batches
    trainer = L.Trainer(
        default_root_dir=str(root), accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=strategy, precision=t.precision, max_steps=t.max_steps,
        val_check_interval=t.val_every_n_steps * per_step, check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps * (per_step if cfg.stage == "sr" else 1),
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None, deterministic=t.deterministic,
        logger=logger, callbacks=callbacks, plugins=plugins,
        enable_progress_bar=console.show_progress(), enable_model_summary=console.show_progress())
    if hasattr(logger, "step_source"):  # W&B rows on the trainer's global step (tracking.py)
        logger.step_source = trainer
    return trainer


# keys a resumed run may change: how long and where it runs, how often it logs/validates/saves,
# where its inputs now live (moved files), the logger; anything else would silently train the
# rest of the run (or nothing, when it had finished) under another config than its checkpoints
RESUME_MAY_CHANGE = ("run.name", "run.dir", "run.export_dir", "logger.", "trainer.max_steps",
                     "trainer.max_minutes", "trainer.val_every_n_steps", "trainer.log_every_n_steps",
                     "trainer.checkpoint_every_n_steps", "trainer.keep_last_n",
                     "trainer.max_nonfinite_skips", "trainer.devices", "trainer.num_nodes",
                     "trainer.accelerator", "trainer.strategy", "data.num_workers",
                     "data.val_batch_size",  # memory only (data.validation: metrics don't change)
                     "data.train_shards", "data.val_shards", "data.val_folder",
                     "data.val_paired_lr", "data.val_paired_hr", "data.max_bad_fraction",
                     "data.min_samples_for_bad_check", "model.pretrained", "sr.estimator",
                     "sr.lpips_vgg", "disc.backbone",
                     "sr.gradient_checkpointing")  # memory only: the same values recomputed


def _check_same_run(root: Path, cfg: DictConfig) -> None:
    """A run directory holds one run: resuming it under another stage, or with a key changed
    that is not in RESUME_MAY_CHANGE, is a one-line error (nothing is written)."""
    import yaml
    from omegaconf import OmegaConf

    try:
        saved = yaml.safe_load((root / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):  # the checkpoint load still refuses other weights' shapes
        console.log.warning(f"run {root}: its config.yaml is missing or unreadable, so this "
                            "config cannot be checked against the run's; resuming with it")
        return
    if saved.get("stage") is not None and saved.get("stage") != cfg.stage:
        raise UserError(f"run {root} holds a stage-'{saved['stage']}' run; this is stage "
                        f"'{cfg.stage}': give it another run.name")
    old, new = flatten(saved), flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = [k for k in sorted(old.keys() & new.keys())
               if old[k] != new[k] and not k.startswith(RESUME_MAY_CHANGE)]
    if changed:
        shown = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UserError(f"run {root} was trained with another config (its config.yaml): {shown}"
                        f"{more}; resume it with the same values, or give another run.name to "
                        "start a new run")
    steps = old.get("trainer.max_steps")
    if cfg.stage == "estimator" and cfg.estimator.lr_schedule == "cosine" and steps not in (
            None, cfg.trainer.max_steps):  # LambdaLR keeps the step, the factor is recomputed
        console.log.warning(f"run {root}: trainer.max_steps {steps} -> {cfg.trainer.max_steps} "
                            "with estimator.lr_schedule=cosine: the learning rate jumps to the new "
                            "cosine's value at the checkpoint's step (from ~0, resuming an ended run)")


def _say_why_nothing_trained(root: Path, cfg: DictConfig, step: int, resumed_at: float,
                             preempted: bool) -> None:
    """A rerun that trained nothing 'finished' at once, silently: say why."""
    t = cfg.trainer
    if step > t.max_steps:
        console.log.warning(f"run {root}: its checkpoint is at step {step}, past "
                            f"trainer.max_steps={t.max_steps}: nothing trained (a run cannot go "
                            "back; give another run.name for a shorter one)")
    elif step == resumed_at < t.max_steps and t.max_minutes and not preempted:
        console.log.warning(f"run {root}: nothing trained: earlier attempts used up its "
                            f"trainer.max_minutes={t.max_minutes:g} (the clock counts over every "
                            f"attempt of a run) at step {step} of {t.max_steps}; raise "
                            "trainer.max_minutes to train on")


def fit(cfg: DictConfig) -> dict:
    """Train the configured stage; returns where things were written and the final metrics."""
    if "SLURM_JOB_ID" not in os.environ:  # Slurm installed here but not in a job: nothing to say
        warnings.filterwarnings("ignore", message=r".*`srun` command is available on your system")
    from degsr.data.module import SRDataModule

    check_allocation(cfg)  # before any model is built or device touched
    # the data's paths before the run directory is made: a typo in data.train_shards is one
    # line, not a failed run (config.yaml, events.jsonl) that the corrected rerun resumes
    data = SRDataModule(cfg.data, cfg.degradation, seed=cfg.run.seed)
    data.check_sources()
    root = run_dir(cfg)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"run.dir/run.name: {root} or a folder above it is a file, not a folder: "
                        "give another run.dir or run.name") from None
    except OSError as e:
        raise UserError(f"run.dir: cannot create the run directory {root} ({e.strerror or e})") from None
    with RunLock(root) as lock:  # before anything is read: another fit may be writing the run
        if lock.file is not None:  # no other fit writes it: an earlier one's cut-off saves go
            remove_stale_temps(root / "checkpoints")
        return _fit(cfg, root, data)


def _fit(cfg: DictConfig, root: Path, data) -> dict:
    resume = find_resume(root / "checkpoints")
    if resume is None and (root / "final.json").is_file():
        raise UserError(f"run {root} has ended (final.json) but checkpoints/ holds no usable "
                        "checkpoint to resume from: its export and logs are left as they are; "
                        "give another run.name to train again")
    if resume is None:  # a resumed run's config.yaml is rewritten once its checkpoint has loaded
        if global_rank_zero():  # the lock holder (another rank of a job submitted twice must
            save_config(cfg, root)  # not rewrite the config of the run being trained)
    else:
        if not is_lightning(resume):
            raise UserError(f"run {root}: {resume} is not a checkpoint degsr fit wrote (no "
                            "Lightning state): move it out of checkpoints/ to resume from the "
                            "others, or give another run.name")
        _check_same_run(root, cfg)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    last = root / "checkpoints" / "last.ckpt"
    preemption = Preemption(last)
    preemption.arm()  # a SIGUSR1 while the models load is honoured at the first step
    try:
        module = build_module(cfg)
        runlog = RunLog(root, cfg, resume, preemption)
        preemption.on_preempt = runlog.preempted
        trainer = make_trainer(cfg, root, make_logger(cfg, root), [preemption, runlog])
    except BaseException:
        preemption.disarm()
        raise
    if resume:
        console.log.info(f"resuming from {resume}")
    # read now: training rewrites last.ckpt (the usual resume) at the step it ends on
    resumed_at = checkpoint_step(resume) if resume is not None else None
    failed = True
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
        if resume is not None:
            runlog.end_skipped(trainer, module)
        if resume is not None:
            _say_why_nothing_trained(root, cfg, trainer.global_step, resumed_at,
                                     preemption.preempted)
        failed = False
    except BaseException as e:
        # the ranks this process started (Lightning's subprocess launcher) must not outlive the
        # error: one could wait in a collective for this rank forever (seen: a NaN stop on both
        # ranks left rank 1 blocked after rank 0 exited)
        launcher = getattr(trainer.strategy, "launcher", None)
        if trainer.global_rank == 0 and getattr(launcher, "procs", None):
            launcher.kill(signal.SIGKILL)
        if isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None  # Lightning turns Ctrl-C into exit(1)
        if isinstance(e, SIGTERMException):  # a SystemExit without a code: status 0, silent
            from degsr.cli import Terminated  # "terminated", status 143 as the other commands

            raise Terminated() from None
        if resume is not None and isinstance(e, (RuntimeError, ValueError)) and (
                "Error(s) in loading state_dict" in str(e)  # the weights
                or "parameter group that doesn't match" in str(e)):  # the optimizer's groups
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            kept = "; the run's config.yaml is unchanged" if (root / "config.yaml").is_file() else ""
            raise UserError(f"run {root}: its checkpoint {resume.name} does not fit this config "
                            f"({lines[min(1, len(lines) - 1)]}){kept}: give another run.name to "
                            "start a new run") from None
        raise
    finally:
        preemption.disarm()  # Lightning skips on_exception for some failures (a restore's)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        finish_wandb(3 if preemption.preempted else 1 if failed else 0)  # sweeps see failures
    if preemption.preempted and trainer.is_global_zero and under_slurm():
        append_event(root, "requeue", ok=requeue())  # the last thing: Slurm then ends the tasks
    metrics = final_metrics(trainer) or ended_metrics(root)
    return {"run_dir": str(root), "global_rank": trainer.global_rank, "global_step": trainer.global_step,
            "status": "preempted" if preemption.preempted else "finished",
            "export": None if preemption.preempted else str(root / cfg.run.export_dir),
            "last_checkpoint": str(last) if last.is_file() else None, "metrics": metrics}
