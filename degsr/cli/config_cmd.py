"""``degsr config FILE... [key=value ...]``: print the resolved, validated config."""

from __future__ import annotations

NAME = "config"
HELP = "print the resolved config tree (schema defaults <- YAML files <- key=value overrides)"


def add_arguments(p) -> None:
    p.add_argument("items", nargs="*", metavar="FILE|key=value",
                   help="YAML config files (merged in order), then dotted key=value overrides")


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """Arguments containing '=' are overrides; the others are config files."""
    files = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return files, overrides


def run(args) -> int:
    from degsr.config import load_config, to_yaml

    files, overrides = split_items(args.items)
    cfg = load_config(files, overrides)
    if cfg.stage == "sr" and cfg.model.pretrained:  # what fit would refuse, found now
        from degsr.sr.folder_check import check_pretrained_folder

        check_pretrained_folder(cfg.model.pretrained, cfg.model.timestep)
    print(to_yaml(cfg), end="")
    return 0
