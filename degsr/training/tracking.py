"""Experiment tracking of ``degsr fit``: the logger (W&B, offline by default, or CSV), the W&B
run id that a requeued job or a sweep agent's run keeps, closing the run, export artifacts."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf



def sweep_run_id() -> str | None:
    """The run id a W&B sweep agent gave this process, if any."""
    return os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else None


def run_dir(cfg: DictConfig) -> Path:
    """``<run.dir>/<run.name>``, with a sweep agent's run id appended under a W&B sweep."""
    name = cfg.run.name + (f"-{sweep_run_id()}" if sweep_run_id() else "")
    return Path(cfg.run.dir).expanduser() / name


def wandb_id(cfg: DictConfig) -> str:
    """A stable W&B run id from the run directory: a requeued job logs into the same run."""
    if sweep_run_id():
        return sweep_run_id()
    name = re.sub(r"[^A-Za-z0-9_-]", "-", cfg.run.name)[:48]
    digest = hashlib.sha1(str(run_dir(cfg).resolve()).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def make_logger(cfg: DictConfig, root: Path):
    if not cfg.logger.wandb:
        return CSVLogger(save_dir=str(root), name="csv")  # version_N per start: a resume keeps the old
    os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = GlobalStepWandbLogger(
        project=cfg.logger.project, name=root.name, id=wandb_id(cfg), save_dir=str(root),
        group=cfg.logger.group, tags=list(cfg.logger.tags),
        config=OmegaConf.to_container(cfg, resolve=True), resume="allow",
        log_model=bool(cfg.logger.log_artifacts))
    # Lightning passes wandb.init anonymous=None, which wandb warns about at every start ("has
    # no effect and will be removed"): leave the setting out
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


class GlobalStepWandbLogger(WandbLogger):
    """Every row's ``trainer/global_step`` (the x axis of every W&B chart) is the trainer's
    global step, the step of checkpoints, ``max_steps``, ``final.json`` and the logged images.
    Lightning passes its own counter instead: the training batches (stage 2 steps by hand, so
    with ``sr.accumulate`` 4 the scalars ran at 4x the generator step that the images and
    checkpoints show), and a validation pass after step N logged at N - 1."""

    step_source = None  # the Trainer (:func:`degsr.training.fit.make_trainer` sets it)

    def log_metrics(self, metrics, step=None):
        if step is not None and self.step_source is not None:
            step = self.step_source.global_step
        super().log_metrics(metrics, step)


def finish_wandb(exit_code: int) -> None:
    """Close this process's W&B run (a later ``fit`` in the same process starts its own); a
    non-zero exit code lets a W&B sweep hand a preempted run out again."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def is_wandb(logger) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def log_export_artifact(logger, folder: Path, name: str) -> None:
    import wandb

    art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", f"{name}-export"), type="model")
    art.add_dir(str(folder))
    logger.experiment.log_artifact(art)
