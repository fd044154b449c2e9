"""Online negatives (METHOD.md, stage 2): some samples learn what *bad* looks like.

Each sample, with probability ``prob``, is marked negative: it is paired with the negative prompt
and its reconstruction target becomes its own upsampled degraded input (``lr_up``) instead of
``gt``. The GAN term ignores this and uses the positive prompt for every sample.
"""

from __future__ import annotations

import torch

from degsr.degradation.ops import bernoulli


def online_negatives(batch: dict, generator: torch.Generator, prob: float = 0.05) -> dict:
    """Return ``batch`` plus ``negative`` (B,) bool and ``target`` (gt, or lr_up where negative)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"negative probability must be in [0, 1], got {prob}")
    negative = bernoulli(generator, batch["gt"].shape[0], prob)
    target = torch.where(negative.view(-1, 1, 1, 1), batch["lr_up"], batch["gt"])
    return {**batch, "negative": negative, "target": target}
