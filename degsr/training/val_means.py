"""Validation means over the whole set, each sample counted once, on any number of ranks.

Lightning's ``self.log(..., sync_dist=True)`` averages per-batch means; under DDP the sampler's
padding repeats samples, and a rank whose batches are all padding would log nothing (the ranks'
collectives then fall out of step). :class:`SampleMeans` keeps per-sample sums and counts of
the kept samples (``keep``, see :class:`degsr.data.validation.EvenSplit`) and sums them over the
ranks once, at the end of the epoch.
"""

from __future__ import annotations

from typing import Optional

import torch


class SampleMeans:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}  # name -> float64 [sum, count]

    def add(self, name: str, values: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """Per-sample ``values`` (B,) of ``name``; only where ``keep`` (B,) holds. Call it for
        every batch on every rank, even when nothing is kept (the names must agree)."""
        v = values.detach().double().reshape(-1)
        w = torch.ones_like(v) if keep is None else keep.to(v).reshape(-1)
        # weights, not indexing: no host sync per batch
        row = torch.stack([torch.where(w > 0, v, 0.0).sum(), w.sum()])
        if name in self.sums:
            self.sums[name] += row
        else:
            self.sums[name] = row

    def clear(self) -> None:
        """Forget what was added (a validation pass cut short)."""
        self.sums.clear()

    def compute(self, strategy=None) -> dict[str, float]:
        """The means, summed over the ranks by ``strategy.reduce`` (a Lightning strategy; None:
        this process only); names with no sample are left out. Resets."""
        names = sorted(self.sums)
        if not names:
            return {}
        table = torch.stack([self.sums[n] for n in names])
        self.sums.clear()
        if strategy is not None:
            table = strategy.reduce(table, reduce_op="sum")
        return {n: s / c for n, (s, c) in zip(names, table.tolist()) if c > 0}
