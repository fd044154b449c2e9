"""Colour correction of the SR output against the upsampled LR (METHOD.md, "Inference").

All functions are pure and batched: ``out`` and ``ref`` are ``(B, C, H, W)`` tensors (C = 3 for
images) of the **same shape** and in the **same value range** -- either [0, 1] or [-1, 1] works:
both corrections are affine-equivariant (``fix(a*out + b, a*ref + b) == a*fix(out, ref) + b``),
because the wavelet kernel sums to one with replicate padding and AdaIN only uses per-channel
moments. Nothing is clamped: the result can leave the range slightly, clamp it yourself.
Computation is in float32 at least (float64 stays float64); the result has ``out``'s dtype.

* ``wavelet``: à-trous ("with holes") wavelet decomposition with the 3×3 binomial kernel
  ``[[1,2,1],[2,4,2],[1,2,1]] / 16`` applied ``levels`` times at dilations 1, 2, 4, ...,
  ``2**(levels-1)``, each time on the previous blur, with replicate padding of the dilation.
  ``low`` is the last blur and ``high = x - low`` (the sum of the per-level detail bands). The
  result is ``high(out) + low(ref)``: the output's details on the reference's colours/shading.
* ``adain``: per-sample, per-channel mean and standard deviation of ``out`` matched to ``ref``:
  ``(out - mean_o) / sqrt(var_o + eps) * sqrt(var_r + eps) + mean_r`` (population variance over
  H×W).
* ``none``: ``out`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["COLOR_FIX_MODES", "wavelet_blur", "wavelet_decompose", "wavelet_color_fix",
           "adain_color_fix", "color_fix"]

COLOR_FIX_MODES = ("wavelet", "adain", "none")

_BINOMIAL = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))


def _check_pair(out: torch.Tensor, ref: torch.Tensor) -> None:
    if out.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(out.shape)}")
    if out.shape != ref.shape:
        raise ValueError(f"out {tuple(out.shape)} and ref {tuple(ref.shape)} must have the same "
                         "shape (upsample the LR to the output size first)")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """One à-trous level: depthwise 3×3 binomial blur at ``dilation``, replicate padding."""
    c = x.shape[1]
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) / 16.0
    k = k.expand(c, 1, 3, 3)
    xp = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(xp, k, groups=c, dilation=dilation)


def wavelet_decompose(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(high, low)`` with ``low`` = ``levels`` successive blurs (dilations 1 … 2**(levels-1))
    and ``high = x - low``. Computed in ``x``'s dtype."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    low = x
    for i in range(levels):
        low = wavelet_blur(low, 2 ** i)
    return x - low, low


def wavelet_color_fix(out: torch.Tensor, ref: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """``high(out) + low(ref)`` (see the module docstring). ``ref``: the upsampled LR."""
    _check_pair(out, ref)
    wd = _work_dtype(out)
    high, _ = wavelet_decompose(out.to(wd), levels)
    _, low = wavelet_decompose(ref.to(wd), levels)
    return (high + low).to(out.dtype)


def adain_color_fix(out: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample, per-channel mean/std of ``out`` set to those of ``ref`` (``eps`` inside the
    square roots, population variance)."""
    _check_pair(out, ref)
    wd = _work_dtype(out)
    o, r = out.to(wd), ref.to(wd)
    var_o, mean_o = torch.var_mean(o, dim=(-2, -1), keepdim=True, correction=0)
    var_r, mean_r = torch.var_mean(r, dim=(-2, -1), keepdim=True, correction=0)
    res = (o - mean_o) / torch.sqrt(var_o + eps) * torch.sqrt(var_r + eps) + mean_r
    return res.to(out.dtype)


def color_fix(out: torch.Tensor, ref: torch.Tensor, mode: str = "wavelet", *,
              levels: int = 5) -> torch.Tensor:
    """Dispatch on ``mode`` in ``COLOR_FIX_MODES``; ``"none"`` returns ``out`` unchanged (same
    object)."""
    if mode == "wavelet":
        return wavelet_color_fix(out, ref, levels=levels)
    if mode == "adain":
        return adain_color_fix(out, ref)
    if mode == "none":
        return out
    raise ValueError(f"color fix mode must be one of {COLOR_FIX_MODES}, got {mode!r}")
