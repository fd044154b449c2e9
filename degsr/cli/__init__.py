"""The ``degsr`` command: one subcommand per module in this package.

Each subcommand module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
User errors (:class:`degsr.errors.UserError`) print as one line each and exit with status 2.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import signal
import sys
import threading

from degsr import __version__, console
from degsr.errors import UserError

SUBCOMMANDS = ["quickstart", "config", "shards", "degrade", "fit", "estimate", "sr", "eval",
               "collect", "bench"]


class DefaultsHelp(argparse.HelpFormatter):
    """Help that states each option's default where its text does not already (and there is
    one to state: not None, not off, not empty: an option whose default is "" or [] says in
    its own text what that means)."""

    @staticmethod
    def _stated(action) -> bool:
        d = action.default
        return bool(action.option_strings) and not (
            d is None or d is False or d is argparse.SUPPRESS or d in ("", [], ()))

    def _format_action(self, action):
        if action.help is None and self._stated(action):  # argparse prints no help line at all
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if self._stated(action) and "default" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def add_verbose(p: argparse.ArgumentParser) -> None:
    """``-v`` after the command too (``degsr sr ... -v``, ``degsr bench infer ... -v``)."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="as degsr -v: debug logging and progress bars everywhere")


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
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                           formatter_class=DefaultsHelp)
        add_verbose(p)
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


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, ``scancel``) as an exception, so that what a command is
    writing is cleaned up on the way out as on Ctrl-C (``io.atomic_write``)."""


def _terminate(signum, frame):
    raise Terminated()


TRAINING = ("fit", "quickstart")  # Lightning and degsr.training handle SIGTERM themselves


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``degsr``'s command line; a subcommand's positionals may also follow its options, as the
    README writes them (``degsr degrade IMAGE... --out DIR key=value``, ``degsr fit CONFIG -v
    key=value``): argparse's plain parse ends a ``nargs='+'`` positional at the first option and
    calls what follows unrecognized."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub = subs.choices[args.command]
        if sub._subparsers is None:  # parse_intermixed_args refuses nested subcommands (bench)
            for key, value in vars(sub.parse_intermixed_args(
                    argv[argv.index(args.command) + 1:])).items():
                setattr(args, key, value)
            return args
        parser.parse_args(argv)  # argparse's own error for what is left over
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.setup(args.verbose)
    previous = signal.getsignal(signal.SIGTERM)
    if args.command not in TRAINING and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    try:
        rc = int(args._run(args) or 0)
        sys.stdout.flush()  # here, not at exit: a reader that left is a BrokenPipeError below
        return rc
    except UserError as e:
        for line in str(e).splitlines():
            print(line if line.startswith(("error", "config error")) else f"error: {line}",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # `degsr estimate ... | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as e:  # the file system refused (disk full, permissions): one line
        console.log.debug("", exc_info=True)
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
