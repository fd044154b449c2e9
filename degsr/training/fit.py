"""``degsr fit``: build the stage's LightningModule, the DataModule, logger and Trainer; train;
export. The run directory is ``<run.dir>/<run.name>`` (no timestamp): a rerun or a requeued job
with the same name resumes from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from degsr import console
from degsr.config import save_config


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.dir).expanduser() / cfg.run.name


def build_module(cfg: DictConfig) -> L.LightningModule:
    if cfg.stage == "estimator":
        from degsr.estimator.module import EstimatorModule
        return EstimatorModule(cfg.estimator, cfg.degradation, seed=cfg.run.seed)
    if cfg.stage == "sr":
        from degsr.sr.module import SRModule
        return SRModule(cfg.model, cfg.lora, cfg.disc, cfg.sr, cfg.degradation, seed=cfg.run.seed,
                        images_every_n_steps=cfg.logger.images_every_n_steps)
    raise ValueError(f"unknown stage {cfg.stage}")  # the schema's choice() rules this out


def wandb_id(cfg: DictConfig) -> str:
    """A stable W&B run id from the run directory: a requeued job logs into the same run."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", cfg.run.name)[:48]
    digest = hashlib.sha1(str(run_dir(cfg).resolve()).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def make_logger(cfg: DictConfig, root: Path):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    if not cfg.logger.wandb:
        return CSVLogger(save_dir=str(root), name="csv", version="")
    os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=cfg.logger.project, name=cfg.run.name, id=wandb_id(cfg),
                       save_dir=str(root), group=cfg.logger.group, tags=list(cfg.logger.tags),
                       config=OmegaConf.to_container(cfg, resolve=True), resume="allow")


class ExportOnEnd(Callback):
    """Writes the stage's export (safetensors + config) when training ends, on rank 0."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            module.export(self.path)


class DataQualityLog(Callback):
    """Logs the DataModule's counts of samples read / corrupt / too small (``data/*``)."""

    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "data_quality") and trainer.global_step % self.every == 0:
            module.log_dict({f"data/{k}": float(v) for k, v in dm.data_quality().items()})


def make_trainer(cfg: DictConfig, root: Path, logger, extra_callbacks=()) -> L.Trainer:
    t = cfg.trainer
    console.quiet_lightning()
    ckpt = ModelCheckpoint(dirpath=str(root / "checkpoints"), every_n_train_steps=t.checkpoint_every_n_steps,
                           save_last=True, save_top_k=1, filename="step{step:07d}",
                           auto_insert_metric_name=False)
    callbacks = [ckpt, DataQualityLog(t.log_every_n_steps), *extra_callbacks]
    if cfg.logger.wandb:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return L.Trainer(
        default_root_dir=str(root), accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision, max_steps=t.max_steps,
        max_time=datetime.timedelta(minutes=t.max_minutes) if t.max_minutes else None,
        val_check_interval=t.val_every_n_steps, check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps, accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None, deterministic=t.deterministic,
        logger=logger, callbacks=callbacks, enable_progress_bar=console.show_progress(),
        enable_model_summary=console.show_progress())


def fit(cfg: DictConfig) -> dict:
    """Train the configured stage; returns where things were written and the final metrics."""
    from degsr.data.module import SRDataModule

    root = run_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    module = build_module(cfg)
    data = SRDataModule(cfg.data, cfg.degradation, seed=cfg.run.seed)
    export = root / cfg.run.export_dir
    trainer = make_trainer(cfg, root, make_logger(cfg, root), [ExportOnEnd(export)])
    last = root / "checkpoints" / "last.ckpt"
    resume = str(last) if last.is_file() else None
    if resume:
        console.log.info(f"resuming from {last}")
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    metrics = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items()}
    return {"run_dir": str(root), "global_step": trainer.global_step, "export": str(export),
            "last_checkpoint": str(last) if last.is_file() else None, "metrics": metrics}
