"""Seeded random streams: one base seed, a distinct stream per (rank, worker, purpose)."""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(base: int, *keys: int) -> int:
    """A 63-bit seed mixed from ``base`` and ``keys`` (numpy SeedSequence: well separated streams).

    The keys go in as SeedSequence's ``spawn_key`` (numpy's position in a tree of streams), not
    as more entropy: an entropy list shorter than the pool is padded with zeros, so ``(s, 0)``
    drew the stream of ``(s,)`` (the validation crops' positions and the first chunk's
    degradations were one stream). Every distinct key tuple gives a distinct stream (tested)."""
    state = np.random.SeedSequence(int(base), spawn_key=tuple(int(k) for k in keys)).generate_state(
        2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def make_generator(base: int, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded from ``base`` and ``keys`` (e.g. rank, worker)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(base, *keys))
    return g


def batch_generator(module, purpose: int, *keys: int,
                    device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for the training batch a LightningModule is on: seeded from (the module's
    ``seed``, ``purpose`` + rank, the run's batch index, ``keys``). Re-made every batch, it
    depends on nothing that ran before, so a resumed run draws exactly what an uninterrupted
    one would. Outside ``trainer.fit`` the batch index is 0."""
    trainer = module._trainer
    index = trainer.fit_loop.epoch_loop.total_batch_idx if trainer is not None else 0
    return make_generator(module.seed, purpose + module.global_rank, max(index, 0), *keys,
                          device=device)
