"""Stage-1 losses: supervised regression, margin ranking, anchors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def margin_ranking(pred_a: Tensor, pred_b: Tensor, true_a: Tensor, true_b: Tensor,
                   margin: float, min_gap: float) -> Tensor:
    """Mean over ranked pairs of max(0, margin - y (pred_a - pred_b)), y = sign(true_a - true_b).

    Pairs whose true scores differ by less than ``min_gap`` are not ranked; with none left the
    loss is 0 (still connected to the graph).
    """
    diff = true_a - true_b
    keep = diff.abs() >= min_gap
    y = torch.sign(diff)
    losses = F.relu(margin - y * (pred_a - pred_b))
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def anchor_loss(pred_clean: Tensor, pred_worst: Tensor) -> Tensor:
    """MSE pulling clean inputs to 0 and the preset's worst case to 1 (both scores)."""
    return F.mse_loss(pred_clean, torch.zeros_like(pred_clean)) + \
        F.mse_loss(pred_worst, torch.ones_like(pred_worst))
