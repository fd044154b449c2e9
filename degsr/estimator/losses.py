"""Stage-1 losses: supervised regression, within-crop differences, margin ranking, anchors."""

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


def anchor_loss(pred_clean: Tensor, pred_worst: Tensor, worst: Tensor | None = None) -> Tensor:
    """Squared error pulling clean inputs to 0 and the preset's worst case to ``worst`` (its
    labels; 1 for both scores when None, the modelled labels' value there).

    As MM-RealSR's anchors: per score the MSE over the batch, **summed** over the scores (its
    ``mean((blur - t)^2) + mean((noise - t)^2)``), like the ranking term, which sums the blur and
    the noise pair. A mean over the scores would halve the anchors against the ranking term and
    break the 1 : 0.01 ratio of MM-RealSR's weights that ``estimator.anchor_weight`` keeps."""
    target = torch.ones_like(pred_worst) if worst is None else worst.to(pred_worst.dtype)
    return (pred_clean.square().mean(0).sum()
            + (pred_worst - target).square().mean(0).sum())


def within_crop_mse(pred: Tensor, true: Tensor, crop: Tensor) -> Tensor:
    """MSE between predicted and true scores (B, S), each taken relative to its mean over the
    samples degraded from the same crop (``crop`` (B,) holds crop indices 0..G-1): the content is
    shared, so only the degradations can explain the differences. Singleton crops add 0."""
    groups = crop.shape[0]  # an upper bound on the crop count: reading crop.max() would sync
    count = torch.zeros(groups, 1, dtype=pred.dtype, device=pred.device).index_add_(
        0, crop, torch.ones_like(pred[:, :1])).clamp(min=1)

    def centred(x: Tensor) -> Tensor:
        total = torch.zeros(groups, x.shape[1], dtype=x.dtype, device=x.device)
        return x - (total.index_add_(0, crop, x) / count)[crop]
    return F.mse_loss(centred(pred), centred(true.to(pred.dtype)))
