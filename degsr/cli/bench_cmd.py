"""``degsr bench NAME``: benchmarks that print one JSON object."""

from __future__ import annotations

import importlib
import json

NAME = "bench"
HELP = "run a benchmark and print its numbers as one JSON object"
BENCHES = {"degradation": "the degradation engine: batched vs one image at a time",
           "loader": "the shard stream vs a folder-of-images loader (samples/s)",
           "estimator": "a stage-1 training step (degradation on the device included): img/s",
           "train": "a stage-2 training step: img/s and peak memory",
           "infer": "bare one-step SD-Turbo vs ours merged + CFG vs unmerged (ms/image)"}


def add_arguments(p) -> None:
    from degsr.cli import add_verbose

    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, help_ in BENCHES.items():
        mod = importlib.import_module(f"degsr.bench.{name}")
        q = sub.add_parser(name, help=help_, description=help_, formatter_class=p.formatter_class)
        add_verbose(q)
        mod.add_arguments(q)
        q.add_argument("--json", action="store_true", help="print one JSON object (default: too)")
        q.set_defaults(_bench=mod.run)


def run(args) -> int:
    from degsr.cli import user_device

    if getattr(args, "device", None) is not None:
        user_device(args.device)  # a one-line error before any model is built
    print(json.dumps(args._bench(args)))
    return 0
