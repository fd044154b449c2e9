"""``degsr collect RUN_DIR_OR_PARENT... [--out table.md] [--sort KEY]``: the final metrics of
finished runs as one markdown table (the logic and the column rules: :mod:`degsr.experiments`).
"""

from __future__ import annotations

from pathlib import Path

NAME = "collect"
HELP = ("one markdown table of runs: name, stage, status, step, the config keys that differ "
        "between them, final metrics")


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_PARENT",
                   help="run directories (config.yaml [+ final.json]) or folders searched "
                        "recursively for them; runs without final.json are listed as "
                        "'unfinished' (metrics from their W&B summary when there is one)")
    p.add_argument("--out", metavar="FILE", help="also write the table to FILE (atomically)")
    p.add_argument("--sort", metavar="COLUMN",
                   help="sort rows by this column, e.g. val/psnr_y or sr.gan_weight (numbers "
                        "numerically; missing values last); default: path order")
    p.add_argument("--desc", action="store_true", help="sort descending")
    p.add_argument("--metrics", default="val*", metavar="GLOBS",
                   help="comma-separated glob patterns of the metric columns (default 'val*': "
                        "validation metrics; '*' = every final metric, train/* included)")
    p.add_argument("--max-keys-per-section", type=int, default=6, metavar="N",
                   help="a config section with more differing keys than N becomes one column "
                        "whose letters A, B, ... name its distinct settings (default 6)")


def run(args) -> int:
    from degsr.experiments import collect
    from degsr.errors import UserError
    from degsr.io import atomic_write_bytes

    patterns = [p.strip() for p in args.metrics.split(",") if p.strip()]
    table, _ = collect(args.paths, metrics=patterns, sort=args.sort, descending=args.desc,
                       max_keys_per_section=args.max_keys_per_section)
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name, e.g. {out / 'runs.md'}")
    print(table, end="")
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, table.encode())
        except OSError as e:
            raise UserError(f"--out {out}: cannot write ({e.strerror or e})") from None
    return 0
