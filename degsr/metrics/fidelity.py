"""PSNR and SSIM on the Y channel, the super-resolution literature's convention (BasicSR's
``calculate_psnr`` / ``calculate_ssim`` with ``test_y_channel=True``):

* Y (ITU-R BT.601, studio range) on the 0-255 scale, float64, no rounding:
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` for R, G, B in [0, 1]
  (i.e. ``16 + (65.481 R' + 128.553 G' + 24.966 B') / 255`` for R', G', B' in 0-255);
* ``crop_border`` pixels are removed from every edge before anything else;
* PSNR = 10 log10(255^2 / MSE) over the whole (cropped) Y image; +inf when MSE == 0;
* SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5, normalised), 'valid'
  filtering (no padding: the map is (H-10) x (W-10)), C1 = (0.01*255)^2, C2 = (0.03*255)^2,
  population (biased) variances, averaged over the map.

Inputs are (B, 3, H, W) RGB tensors in [0, 1]; they are neither clamped nor quantised. BasicSR's
test pipeline writes images as uint8 first (``tensor2img``): to reproduce published numbers exactly,
pass ``(x.clamp(0, 1) * 255).round() / 255``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rgb_to_y", "psnr_y", "ssim_y"]

_Y_WEIGHTS = (65.481, 128.553, 24.966)
_SSIM_SIZE = 11
_SSIM_SIGMA = 1.5
_C1 = (0.01 * 255.0) ** 2
_C2 = (0.03 * 255.0) ** 2


def _check(pred: Tensor, gt: Tensor, crop_border: int, min_size: int) -> None:
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"expected two (B, 3, H, W) RGB tensors of equal shape, got "
                         f"{tuple(pred.shape)} and {tuple(gt.shape)}")
    if int(crop_border) != crop_border or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative integer, got {crop_border!r}")
    h, w = pred.shape[-2:]
    if min(h, w) - 2 * crop_border < min_size:
        raise ValueError(f"image {h}x{w} with crop_border={crop_border} leaves less than "
                         f"{min_size}x{min_size} pixels")


def _crop(x: Tensor, c: int) -> Tensor:
    return x[..., c:x.shape[-2] - c, c:x.shape[-1] - c] if c else x


def rgb_to_y(img: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) float64 Y on the 0-255 scale (16..235 for
    in-range input): ``16 + 65.481 R + 128.553 G + 24.966 B``."""
    w = torch.tensor(_Y_WEIGHTS, dtype=torch.float64, device=img.device).view(1, 3, 1, 1)
    return (img.to(torch.float64) * w).sum(dim=1, keepdim=True) + 16.0


def psnr_y(pred: Tensor, gt: Tensor, crop_border: int = 0) -> Tensor:
    """PSNR (dB) on the Y channel, per image: (B,) float64; +inf for identical images."""
    _check(pred, gt, crop_border, 1)
    c = int(crop_border)
    y1, y2 = rgb_to_y(_crop(pred, c)), rgb_to_y(_crop(gt, c))
    mse = (y1 - y2).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)  # mse == 0 -> +inf


def _gaussian_taps() -> list[float]:
    r = torch.arange(_SSIM_SIZE, dtype=torch.float64) - (_SSIM_SIZE - 1) / 2
    g = torch.exp(-(r**2) / (2 * _SSIM_SIGMA**2))
    return (g / g.sum()).tolist()


def _gaussian_valid(x: Tensor, taps: list[float]) -> Tensor:
    """The 11x11 Gaussian (the outer product of ``taps``), 'valid', as two 1-D passes of shifted
    slices: memory of the output only (a float64 ``conv2d`` on the CPU unfolds 121 values a
    pixel: 13 GB for one 2040 x 1356 image)."""
    n, (h, w) = len(taps), x.shape[-2:]
    rows = sum(t * x[..., k:h - n + 1 + k, :] for k, t in enumerate(taps))
    return sum(t * rows[..., k:w - n + 1 + k] for k, t in enumerate(taps))


def ssim_y(pred: Tensor, gt: Tensor, crop_border: int = 0) -> Tensor:
    """SSIM on the Y channel (0-255 scale, float64), per image: (B,) float64."""
    _check(pred, gt, crop_border, _SSIM_SIZE)
    c = int(crop_border)
    x, y = rgb_to_y(_crop(pred, c))[:, 0], rgb_to_y(_crop(gt, c))[:, 0]
    taps = _gaussian_taps()
    mu_x, mu_y = _gaussian_valid(x, taps), _gaussian_valid(y, taps)
    var_x = _gaussian_valid(x * x, taps) - mu_x**2
    var_y = _gaussian_valid(y * y, taps) - mu_y**2
    cov = _gaussian_valid(x * y, taps) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + _C1) * (2 * cov + _C2)) / (
        (mu_x**2 + mu_y**2 + _C1) * (var_x + var_y + _C2))
    return ssim_map.mean(dim=(1, 2))
