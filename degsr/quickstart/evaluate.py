"""The quickstart's ``sr`` and ``eval`` steps: ``degsr sr`` and ``degsr eval`` run in-process with
their own argument parsers and ``run`` functions, i.e. exactly what a user runs."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
from pathlib import Path

from degsr.errors import UserError

SCALE = 4


def _cli(argv: list[str]) -> tuple[int, str]:
    """Run a ``degsr`` subcommand in-process with its own arguments and ``run`` (what the command
    line runs); returns (status, stdout). A failure is a UserError."""
    mod = importlib.import_module(f"degsr.cli.{argv[0]}_cmd")
    parser = argparse.ArgumentParser(prog=f"degsr {argv[0]}")
    mod.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = int(mod.run(args) or 0)
    if status:
        raise UserError(f"`degsr {' '.join(argv)}` failed (exit {status}); see the lines above")
    return status, buf.getvalue()


def sr_command(p) -> list[str]:
    return ["sr", str(p.lr), "--adapter", str(p.stage2 / "export"), "--pretrained", str(p.base),
            "--out", str(p.sr)]


def eval_command(p, pred: Path) -> list[str]:
    return ["eval", "--pred", str(pred), "--gt", str(p.hr), "--crop-border", str(SCALE), "--json"]


MADE_BY = ".made_by.json"  # beside the SR outputs: the adapter and base that made them


def made_by(p) -> dict:
    """What the SR outputs depend on: the adapter's weights (size, modification time) and the
    base folder. Outputs whose stamp differs were made by another model and are redone."""
    weights = (p.stage2 / "export" / "adapter.safetensors").stat()
    return {"adapter": [weights.st_size, weights.st_mtime_ns], "pretrained": str(p.base)}


def sr_current(p) -> bool:
    try:
        return json.loads((p.sr / MADE_BY).read_text()) == made_by(p)
    except (OSError, ValueError):
        return False


def run_sr(p, overwrite: bool) -> dict:
    from degsr.io import atomic_write_bytes
    from degsr.quickstart.report import make_eval_inputs
    from degsr.sr.model import read_adapter_meta

    mode = read_adapter_meta(p.stage2 / "export")[1].get("upsample_mode", "bicubic")
    names = make_eval_inputs(p.heldout, p.hr, p.lr, p.bicubic, SCALE, mode)
    overwrite = overwrite or not sr_current(p)  # another adapter's (or a mixed) set: all again
    (p.sr / MADE_BY).unlink(missing_ok=True)  # an interrupted run leaves no stamp
    _cli(sr_command(p) + (["--overwrite"] if overwrite else []))
    atomic_write_bytes(p.sr / MADE_BY, json.dumps(made_by(p)).encode())
    return {"images": names}


def run_eval(p) -> dict:
    out = {}
    for name, pred in (("bicubic", p.bicubic), ("degsr", p.sr)):
        _, text = _cli(eval_command(p, pred))
        out[name] = json.loads(text.strip().splitlines()[-1])
    return out
