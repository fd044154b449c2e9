"""Count the operator calls of one degradation-engine call on its accelerator path, on the CPU.

On a GPU the engine is bound by the host (launches; docs/benchmarks.md, session 5), so the
count of top-level ATen calls is a proxy of its speed there that needs no GPU. Each call is
counted with ``ops.accelerator_path()`` (dense masks, FFT blur, ``torch.poisson``, the
accelerator's resize groups) and broken down by the engine's steps.

    python experiments/engine_ops.py [--preset s3diff] [--batch 64] [--size 256]
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from degsr.bench.degradation import _photo_batch
from degsr.config import load_config
from degsr.degradation import ops
from degsr.degradation.pipeline import Degrader
from degsr.io import preset_path


CALLS = 3  # calls of each step profiled


def top_level_ops(fn) -> tuple[int, collections.Counter]:
    """ATen calls per call of ``fn`` that no other ATen call made (the ones the host issues),
    and their count by name over :data:`CALLS` calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(CALLS):
            fn()
    kinds: collections.Counter = collections.Counter()
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            kinds[e.name] += 1
    return sum(kinds.values()) // CALLS, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=["s3diff", "realesrgan"], default="s3diff")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    d = Degrader(load_config([preset_path(args.preset)]).degradation)
    hr = _photo_batch(args.batch, args.size)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), ops.accelerator_path():
        d(hr, g)  # constants, probe, tables: built once per process
        total, kinds = top_level_ops(lambda: d(hr, g))
        print(f"one call ({args.preset}, {args.batch} x {args.size}²): {total} top-level ATen calls")
        print("  most frequent:", ", ".join(f"{k.removeprefix('aten::')} {v // CALLS}"
                                           for k, v in kinds.most_common(8)))
        draw = d.sample(args.batch, g)
        p = draw["params"]
        plans = d._plans(p, d._host_scales(p), [(args.size, args.size), d._probe_size()], hr.dtype)
        resized = d._front(hr, draw, plans[0])
        steps = {
            "sample (draws, kernels)": lambda: d.sample(args.batch, g),
            "plans (resize matrices, both sizes)":
                lambda: d._plans(p, d._host_scales(p), [(args.size, args.size), d._probe_size()], hr.dtype),
            "front (blur 1, resize 1)": lambda: d._front(hr, draw, plans[0]),
            "render (the LR)": lambda: d._render(plans[0], resized, draw, g),
            "render without noise, JPEG (noise label)": lambda: d._render(plans[0], resized, draw, None),
            "measured blur label (probe plan given)": lambda: d.measured_blur(draw, hr, plans[1]),
        }
        for name, fn in steps.items():
            print(f"  {name}: {top_level_ops(fn)[0]}")


if __name__ == "__main__":
    main()
