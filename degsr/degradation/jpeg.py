"""Exact (non-differentiable) batched JPEG codec with the reference's semantics.

Re-implements what BasicSR's ``DiffJPEG(differentiable=False)`` computes (the Real-ESRGAN
reference) rather than kornia's ``jpeg_codec_differentiable``: DCT coefficients are rounded with
``torch.round`` (true rounding, not round(z) + (z - round(z))³), and the quantisation tables are
scaled by the plain IJG factor (no flooring to integers, no clipping to [1, 255]).

Pipeline per sample: clamp to [0, 1], x255 -> JFIF full-range YCbCr -> pad H, W to multiples of
16 by edge replication -> 4:2:0 chroma (2x2 average) -> -128, 8x8 orthonormal DCT-II -> divide by
table * factor(q), round, multiply back -> inverse DCT, +128 -> chroma repeated 2x (nearest) ->
RGB -> crop -> clamp to [0, 255] -> /255. All samples and blocks are processed at once.

Differences from the reference that are deliberate: padding replicates edges (a real encoder's
behaviour; BasicSR pads with zeros, which darkens the last partial block) and the luma table is
used in its standard orientation (see ``LUMA_TABLE``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from degsr.degradation.ops import constant

# JPEG standard (ITU-T T.81) Annex K tables, K.1 luminance and K.2 chrominance, in the standard
# orientation: row = vertical frequency, column = horizontal frequency. BasicSR stores the luma
# table transposed (``y_table = ... .T``) while indexing coefficients (vertical, horizontal), so
# the reference quantises with the transposed luma table; the table is nearly symmetric, so the
# effect is small. The chroma table is symmetric, so its transpose in BasicSR changes nothing.
LUMA_TABLE = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float64)
CHROMA_TABLE = torch.full((8, 8), 99.0, dtype=torch.float64)
CHROMA_TABLE[:4, :4] = torch.tensor([
    [17, 18, 24, 47],
    [18, 21, 26, 66],
    [24, 26, 56, 99],
    [47, 66, 99, 99]], dtype=torch.float64)

MIN_STEP = 1e-3  # floor on a scaled table entry: at q -> 100 the factor -> 0 (effectively lossless)

_RGB_TO_YCC = torch.tensor([[0.299, 0.587, 0.114],
                            [-0.168736, -0.331264, 0.5],
                            [0.5, -0.418688, -0.081312]], dtype=torch.float64)
_YCC_TO_RGB = torch.tensor([[1.0, 0.0, 1.402],
                            [1.0, -0.344136, -0.714136],
                            [1.0, 1.772, 0.0]], dtype=torch.float64)


def quality_to_factor(quality: Tensor) -> Tensor:
    """IJG scaling as the reference applies it: 50/q below 50, 2 - q/50 from 50 on (no flooring).

    ``quality`` is clamped to [1, 100]; the factor is 0 at q = 100 (guarded in ``jpeg``).
    """
    q = torch.as_tensor(quality).clamp(1.0, 100.0)
    return torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q) / 100.0


def _dct_matrix(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Orthonormal 8-point DCT-II matrix D (D @ v is scipy.fft.dct(v, norm='ortho'))."""
    k = torch.arange(8, dtype=torch.float64).view(8, 1)
    n = torch.arange(8, dtype=torch.float64).view(1, 8)
    d = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    d[0] = math.sqrt(1 / 8)
    return d.to(dtype=dtype, device=device)


_DCT = _dct_matrix(torch.float64, torch.device("cpu"))
_YCC_CHROMA = _YCC_TO_RGB[:, 1:].contiguous()  # the chroma columns of YCbCr -> RGB


def _code(plane: Tensor, table: Tensor, factor: Tensor, dct: Tensor) -> Tensor:
    """Quantise/dequantise every 8x8 block of (B, C, H, W) ``plane`` (already centred on 0).

    The block DCT D X Dᵀ runs on the image in place, without gathering the blocks: D along the
    rows of each block band (B, C, H/8, 8, W), then Dᵀ along the columns of each block; the
    coefficients sit at (B, C, H/8, u, W/8, v), where the table broadcasts as (u, v).
    """
    b, c, h, w = plane.shape
    coef = torch.matmul(dct, plane.reshape(b, c, h // 8, 8, w))
    coef = torch.matmul(coef.view(b, c, h // 8, 8, w // 8, 8), dct.T)
    step = (table.view(1, 1, 1, 8, 1, 8) * factor.view(b, 1, 1, 1, 1, 1)).clamp_min(MIN_STEP)
    coef = torch.matmul(coef.div_(step).round_().mul_(step), dct)
    return torch.matmul(dct.T, coef.view(b, c, h // 8, 8, w)).view(b, c, h, w)


def _mix(matrix: Tensor, x: Tensor) -> Tensor:
    """Per-pixel colour transform: (3, K) ``matrix`` times the K channels of (B, K, H, W) ``x``."""
    b, k, h, w = x.shape
    return torch.matmul(matrix, x.reshape(b, k, h * w)).view(b, matrix.shape[0], h, w)


def jpeg(x: Tensor, quality: Tensor) -> Tensor:
    """JPEG-compress and decode each sample of (B, 3, H, W) ``x`` at its own ``quality`` (B,).

    Any H, W (padded to multiples of 16 by edge replication, cropped back); output in [0, 1],
    same dtype and device as ``x``. Not differentiable in any useful sense (true rounding).
    """
    b, _, h, w = x.shape
    dtype, device = x.dtype, x.device
    factor = quality_to_factor(torch.as_tensor(quality, device=device).to(dtype).expand(b))
    img = x.clamp(0, 1) * 255.0
    # YCbCr centred on 0 (Y - 128, Cb, Cr: the +128 offsets cancel around the DCT)
    ycc = _mix(constant(_RGB_TO_YCC, img.dtype, img.device), img)
    ycc[:, 0] -= 128.0
    ph, pw = -h % 16, -w % 16
    if ph or pw:
        ycc = F.pad(ycc, (0, pw, 0, ph), mode="replicate")
    dct = constant(_DCT, dtype, device)
    luma = _code(ycc[:, :1], constant(LUMA_TABLE, img.dtype, img.device), factor, dct)
    chroma = _code(F.avg_pool2d(ycc[:, 1:], 2), constant(CHROMA_TABLE, img.dtype, img.device), factor, dct)
    # RGB = Y + M[:, 1:] (Cb, Cr): the chroma term at half resolution, then repeated 2x2
    tint = _mix(constant(_YCC_CHROMA, img.dtype, img.device), chroma)
    hh, hw = tint.shape[-2:]
    tint = tint.view(b, 3, hh, 1, hw, 1).expand(b, 3, hh, 2, hw, 2).reshape(b, 3, 2 * hh, 2 * hw)
    rgb = (tint[:, :, :h, :w] + luma[:, :, :h, :w]).add_(128.0)
    return rgb.clamp_(0.0, 255.0).div_(255.0)
