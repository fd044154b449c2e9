"""``degsr fit CONFIG... [key=value ...]``: train the stage a config names."""

from __future__ import annotations

import json

NAME = "fit"
HELP = "train a stage (config key `stage`): checkpoints, W&B logs (offline) and an export"


def add_arguments(p) -> None:
    p.add_argument("items", nargs="+", metavar="FILE|key=value",
                   help="YAML config files (merged in order), then dotted key=value overrides, "
                        "e.g. configs/estimator_tiny.yaml trainer.max_steps=50")


def run(args) -> int:
    from degsr.cli.config_cmd import split_items
    from degsr.config import load_config
    from degsr.training.fit import fit

    files, overrides = split_items(args.items)
    print(json.dumps(fit(load_config(files, overrides))))
    return 0
