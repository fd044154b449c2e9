"""``degsr fit CONFIG... [key=value ...]``: train the stage a config names."""

from __future__ import annotations

import json

NAME = "fit"
HELP = "train a stage (config key `stage`): checkpoints, W&B logs (offline) and an export"
PREEMPTED = 3  # rank 0's exit status when SIGUSR1 stopped the run (W&B sweeps re-queue on non-zero)


def add_arguments(p) -> None:
    p.add_argument("items", nargs="+", metavar="FILE|key=value",
                   help="YAML config files (merged in order), then dotted key=value overrides, "
                        "e.g. configs/estimator_tiny.yaml trainer.max_steps=50")


def run(args) -> int:
    from degsr.cli.config_cmd import split_items
    from degsr.config import load_config
    from degsr.training.fit import fit

    files, overrides = split_items(args.items)
    out = fit(load_config(files, overrides))
    if out["global_rank"] == 0:  # one summary per run, not one per DDP rank
        print(json.dumps(out))
    return PREEMPTED if out["status"] == "preempted" and out["global_rank"] == 0 else 0
