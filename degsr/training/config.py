"""``trainer.*`` and ``logger.*`` keys: how Lightning runs a stage and where it logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from degsr.config.fields import choice, number, plain, positive

# mixed precision keeps float32 weights; "*-true" ones would cast the weights but not the LR
# the engine makes on the device after Lightning converts the batch (bf16-true, 64-true failed)
PRECISIONS = ["32-true", "bf16-mixed", "16-mixed"]


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments (one key per argument)."""

    accelerator: str = choice("auto", ["auto", "cpu", "gpu", "cuda", "mps"], "where to train")
    devices: int = positive(1, "devices per node (with Slurm: == --ntasks-per-node)")
    num_nodes: int = positive(1, "nodes (with Slurm: == --nodes)")
    strategy: str = choice("auto", ["auto", "ddp", "ddp_find_unused_parameters_true"],
                           "distribution strategy")
    precision: str = choice("32-true", PRECISIONS, "numeric precision (bf16-mixed on GPUs)")
    max_steps: int = positive(1000, "optimizer steps to train")
    max_minutes: Optional[float] = number(None, "stop after this many minutes of training, counted "
                                          "over every attempt of a run (None = no limit)",
                                          lo=0, lo_open=True)
    val_every_n_steps: int = positive(200, "run validation every N optimizer steps")
    log_every_n_steps: int = positive(10, "log scalars every N optimizer steps")
    accumulate_grad_batches: int = positive(1, "batches per optimizer step")
    gradient_clip_val: float = number(0.0, "clip the gradient norm to this (0 = off)", lo=0)
    checkpoint_every_n_steps: int = positive(500, "save a resumable checkpoint every N steps")
    keep_last_n: int = positive(2, "periodic checkpoints kept (plus last.ckpt); the oldest is "
                                "removed only after a new one is complete")
    max_nonfinite_skips: int = positive(20, "stop after this many consecutive steps skipped for a "
                                        "NaN/inf loss on some rank")
    deterministic: bool = plain(False, "torch deterministic algorithms (slower)")


@dataclass
class LoggerConfig:
    """Weights & Biases, offline unless told otherwise (``WANDB_MODE`` wins when set)."""

    wandb: bool = plain(True, "log to W&B (False: CSV logs in the run directory only)")
    project: str = plain("degsr", "W&B project")
    mode: str = choice("offline", ["offline", "online", "disabled"], "W&B mode")
    group: Optional[str] = plain(None, "W&B group (e.g. a sweep or ablation name)")
    tags: List[str] = plain([], "W&B tags")
    images_every_n_steps: int = positive(500, "stage sr: log a training panel (LR up | SR | HR) "
                                         "every N steps (validation images: at every validation)")
    log_artifacts: bool = plain(False, "also log checkpoints and the export as W&B artifacts")
