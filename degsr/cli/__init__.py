"""The ``degsr`` command: one subcommand per module in this package.

Each subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
User errors (:class:`degsr.errors.UserError`) print as one line each and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from degsr import __version__, console
from degsr.errors import UserError

SUBCOMMANDS = ["quickstart", "config", "shards", "degrade", "fit", "estimate", "sr", "eval",
               "collect", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="degsr",
        description="Degradation-guided one-step image super-resolution with a diffusion prior.")
    parser.add_argument("--version", action="version", version=f"degsr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and progress bars even when not on a terminal")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        mod = importlib.import_module(f"degsr.cli.{name.replace('-', '_')}_cmd")
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def user_device(name):
    """``--device NAME`` as a torch.device that exists here; UserError (one line) otherwise."""
    import torch

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f"--device {name}: not available ({e})".splitlines()[0]) from None
    return device


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is PyTorch running out of memory (a CUDA OOM, or the CPU allocator's)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    text = str(e)
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text))


def each_fitting(group: list, fn, fail) -> None:
    """``fn(group)``; when that runs out of memory, ``fn`` on each item alone, and an item that
    alone does not fit goes to ``fail(item, message)``: one image too large never ends a run of
    many, nor takes the images batched with it down."""
    import torch

    try:
        fn(group)
        return
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled, others re-raised
        if not out_of_memory(e):
            raise
        message = f"out of memory ({str(e).strip().splitlines()[0][:160]})"
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(group) == 1:
        fail(group[0], message)
        return
    for item in group:
        each_fitting([item], fn, fail)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(args.verbose)
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        for line in str(e).splitlines():
            print(line if line.startswith(("error", "config error")) else f"error: {line}",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
