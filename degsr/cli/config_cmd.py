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
    print(to_yaml(load_config(files, overrides)), end="")
    return 0
