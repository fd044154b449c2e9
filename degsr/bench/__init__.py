"""Benchmarks: commands that print numbers (JSON), never timed tests."""

from __future__ import annotations

import time
from typing import Callable

import torch


def at_least(low: int):
    """An argparse ``type``: an integer >= ``low`` (argparse then reports a bad value in one
    line with exit 2, before anything is built)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def gib(text: str) -> float:
    """An argparse ``type``: a finite number of GiB >= 0. A negative cap reached
    ``torch.cuda.set_per_process_memory_fraction`` as a traceback after the model was built."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(fns: dict[str, Callable[[], object]], device: torch.device, iters: int,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each of ``fns`` over ``iters`` interleaved rounds (one call of
    each per round, after ``warmup`` calls of each): a drift of the machine (clocks, a compiler
    still busy in the background) then falls on every variant alike, not on the one timed last."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
