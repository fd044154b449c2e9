"""What a run writes besides checkpoints and logs (rank 0): ``events.jsonl``, one JSON line per
start, preemption, error and end with the global step, flushed to disk; ``final.json`` (``run_name,
stage, global_step, status, metrics, export``), which ``degsr collect`` reads; and the export when
training ends normally (:class:`RunLog`)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from degsr import console
from degsr.config import save_config
from degsr.io import atomic_write_bytes
from degsr.training.cluster import Preemption
from degsr.training.tracking import is_wandb, log_export_artifact


class RunLog(Callback):
    """``events.jsonl`` and ``final.json`` in the run directory (rank 0), the export at the end.

    The export is written when training ends normally (max_steps or max_minutes), not when it
    stopped to be requeued.
    """

    def __init__(self, root: Path, cfg: DictConfig, resumed_from: Path | None,
                 preemption: Preemption):
        self.root, self.cfg, self.resumed_from = root, cfg, resumed_from
        self.preemption = preemption
        self.export_path = root / cfg.run.export_dir
        self.ended = False  # on_train_end ran (Lightning skips it when nothing is left to train)

    def event(self, trainer, name: str, **fields) -> None:
        if trainer.is_global_zero:
            append_event(self.root, name, step=trainer.global_step, **fields)

    def on_train_start(self, trainer, module) -> None:
        if trainer.is_global_zero:  # a new attempt: its config (the checkpoint loaded), no end yet
            if self.resumed_from:
                save_config(self.cfg, self.root)
            (self.root / "final.json").unlink(missing_ok=True)
        self.event(trainer, "start", resumed_from=str(self.resumed_from) if self.resumed_from else None,
                   world_size=trainer.world_size, slurm_job=os.environ.get("SLURM_JOB_ID"),
                   restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)))

    def preempted(self, trainer, will_requeue: bool, signame: str = "SIGUSR1") -> None:
        self.event(trainer, "preempt", signal=signame, requeue=will_requeue)
        logger = trainer.logger
        # A W&B sweep hands a run marked preempting out again, to be resumed: right for SIGUSR1
        # (Slurm's time-limit warning, which slurm/sweep.sh passes on to the run), wrong for
        # SIGTERM, which is how a sweep agent stops a run its early termination (hyperband)
        # dropped: marked, every dropped run came back. A SIGTERM run is saved, not marked.
        if (signame == "SIGUSR1" and trainer.is_global_zero and hasattr(logger, "experiment")
                and is_wandb(logger)):
            try:
                logger.experiment.mark_preempting()
            except Exception as e:  # noqa: BLE001 - logging must not break the save
                console.log.debug(f"wandb mark_preempting: {e}")

    def on_train_end(self, trainer, module) -> None:
        self.ended = True
        status = "preempted" if self.preemption.preempted else "finished"
        if status == "finished" and trainer.is_global_zero:
            module.export(self.export_path)
            if self.cfg.logger.log_artifacts and is_wandb(trainer.logger):
                log_export_artifact(trainer.logger, self.export_path, self.root.name)
        if not trainer.is_global_zero:
            return
        metrics = final_metrics(trainer)
        self.event(trainer, "end", status=status)
        doc = {"run_name": self.root.name, "stage": self.cfg.stage, "global_step": trainer.global_step,
               "max_steps": self.cfg.trainer.max_steps, "status": status, "metrics": metrics,
               "export": str(self.export_path) if status == "finished" else None}
        atomic_write_bytes(self.root / "final.json", (json.dumps(doc, indent=2) + "\n").encode())

    def on_exception(self, trainer, module, exception) -> None:
        self.event(trainer, "error", error=f"{type(exception).__name__}: {exception}")

    def end_skipped(self, trainer, module) -> None:
        """A resumed checkpoint already at the end trains nothing and Lightning skips
        ``on_train_end``: when the attempt that saved it died before its export or final.json
        (killed in the final validation or the export, a full disk), do that end now, with the
        weight average swapped in as at a normal end."""
        if self.ended or self.preemption.preempted:
            return
        if (self.root / "final.json").is_file() and self.export_path.exists():
            return  # a finished run rerun: nothing to do
        from lightning.pytorch.callbacks import WeightAveraging

        for cb in trainer.callbacks:
            if isinstance(cb, WeightAveraging):
                cb.on_train_end(trainer, module)
        self.on_train_end(trainer, module)


def append_event(root: Path, name: str, **fields) -> None:
    """One line of ``events.jsonl``, flushed to disk (a preempted job may die right after)."""
    line = {"time": round(time.time(), 3), "event": name, **fields}
    with open(root / "events.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def final_metrics(trainer) -> dict[str, float | None]:
    """The trainer's scalar metrics, rounded; a NaN or infinity (a statistic of one validation
    sample, a diverged loss) is None, as JSON has no such number."""
    values = {k: float(v) for k, v in trainer.callback_metrics.items()
              if torch.is_tensor(v) and v.numel() == 1 or isinstance(v, (int, float))}
    return {k: round(v, 6) if math.isfinite(v) else None for k, v in values.items()}


def ended_metrics(root: Path) -> dict:
    """The metrics final.json recorded (a rerun of a finished run trains nothing and has none)."""
    try:
        return json.loads((root / "final.json").read_text()).get("metrics") or {}
    except (OSError, ValueError, AttributeError):
        return {}
