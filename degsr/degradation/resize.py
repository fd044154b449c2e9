"""Per-sample resizing of a batch, every sample to its own size and with its own mode.

``F.interpolate`` resizes a whole batch to one size with one mode. The reference therefore draws the
resize once per batch; degsr draws it per sample. Resizing without antialiasing (what the reference
does, ``F.interpolate`` defaults) is a separable linear map, so each sample's resize is
``R_h @ x @ R_wᵀ`` with interpolation matrices built here in closed form for the whole batch at once
(PyTorch's own index/weight conventions, ``align_corners=False``). Samples of different sizes share
one canvas: each occupies the top-left ``h x w`` corner, and the padding rows/columns of the output
replicate the last valid row/column (so later blur and JPEG see an edge-extended image, as a JPEG
encoder does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from degsr.degradation import ops

RESIZE_MODES = ("area", "bilinear", "bicubic")
_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _cubic_weights(t: Tensor) -> list[Tensor]:
    """Weights of taps at offsets -1, 0, 1, 2 for fractional position t (Keys, a = -0.75)."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def resize_taps(n_in: Tensor, n_out: Tensor, modes: Tensor, size_out: int,
                dtype: torch.dtype = torch.float32, taps: int | None = None) -> tuple[Tensor, Tensor]:
    """Source indices and weights ``(B, size_out, T)`` of every output row (T >= 4 taps).

    Row ``i`` of sample ``b`` is ``sum_t weight[b, i, t] * x[index[b, i, t]]``; unused taps have
    weight 0. ``modes[b]`` indexes RESIZE_MODES; rows past ``n_out[b]`` repeat row
    ``n_out[b] - 1``; indices stay below ``n_in[b]``. T covers the widest area bin, at least
    the 4 bicubic taps: ``taps`` when the caller knows a bound (:func:`tap_bound`), else measured
    (one host sync).
    """
    device = n_in.device
    n_in = n_in.to(torch.long).view(-1, 1, 1)
    n_out = n_out.to(torch.long).view(-1, 1, 1)
    i = torch.minimum(torch.arange(size_out, device=device).view(1, -1, 1), n_out - 1)
    last = n_in - 1

    # area == adaptive average pooling: integer bins [floor(i*n/m), ceil((i+1)*n/m))
    start = (i * n_in) // n_out
    width = ((i + 1) * n_in + n_out - 1) // n_out - start
    t = torch.arange(max(4, taps or int(width.max())), device=device).view(1, 1, -1)
    area_idx = torch.minimum(start + t, last)
    area_w = (t < width).to(dtype) / width.to(dtype)

    src = (i.to(dtype) + 0.5) * (n_in.to(dtype) / n_out.to(dtype)) - 0.5
    lin_src = src.clamp(min=0)
    i0 = lin_src.floor()
    frac = lin_src - i0
    lin_idx = torch.minimum(i0.to(torch.long) + t.clamp(max=1), last)
    lin_w = torch.where(t == 0, 1 - frac, torch.where(t == 1, frac, torch.zeros_like(frac)))

    c0 = src.floor()
    cubic = torch.cat(_cubic_weights(src - c0), dim=-1)  # (B, size_out, 4)
    cub_idx = torch.minimum((c0.to(torch.long) + t.clamp(max=3) - 1).clamp(min=0), last)
    cub_w = torch.nn.functional.pad(cubic, (0, t.shape[-1] - 4))

    m = modes.view(-1, 1, 1)
    index = torch.where(m == 0, area_idx, torch.where(m == 1, lin_idx, cub_idx))
    weight = torch.where(m == 0, area_w, torch.where(m == 1, lin_w, cub_w))
    return index, weight


def tap_bound(n_in: Tensor, n_out: Tensor) -> int:
    """An upper bound on the widest area bin of lengths ``n_in -> n_out`` (host tensors):
    a bin spans at most ceil(n_in / n_out) + 1 source rows."""
    return int((-(-n_in // n_out)).max()) + 1


def scatter_taps(index: Tensor, weight: Tensor, size_in: int) -> Tensor:
    """The (B, size_out, size_in) matrices of the taps of :func:`resize_taps`."""
    out = weight.new_zeros(*index.shape[:2], size_in)
    return out.scatter_add_(2, index, weight)


def resize_matrices(n_in: Tensor, n_out: Tensor, modes: Tensor, size_in: int, size_out: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, size_out, size_in) matrices resizing length ``n_in[b]`` to ``n_out[b]``.

    ``modes[b]`` indexes RESIZE_MODES. Rows past ``n_out[b]`` repeat row ``n_out[b] - 1``; columns
    past ``n_in[b]`` are zero. Built by scattering the taps of :func:`resize_taps`.
    """
    return scatter_taps(*resize_taps(n_in, n_out, modes, size_out, dtype), size_in)


def apply_resize(x: Tensor, rh: Tensor, rw: Tensor) -> Tensor:
    """Each sample b of (B, C, H, W) ``x`` as ``rh[b] @ x[b] @ rw[b]ᵀ`` (every channel)."""
    return rh.unsqueeze(1) @ x @ rw.transpose(1, 2).unsqueeze(1)


def resize_batch(x: Tensor, in_h: Tensor, in_w: Tensor, out_h: Tensor, out_w: Tensor,
                 modes: Tensor, canvas: tuple[int, int]) -> Tensor:
    """Resize sample b's top-left ``in_h[b] x in_w[b]`` region to ``out_h[b] x out_w[b]``.

    Returns a (B, C, *canvas) batch laid out as described in the module docstring.
    """
    rh = resize_matrices(in_h, out_h, modes, x.shape[-2], canvas[0], x.dtype)
    rw = resize_matrices(in_w, out_w, modes, x.shape[-1], canvas[1], x.dtype)
    return apply_resize(x, rh, rw)


def clean_downsample(x: Tensor, scale: int) -> Tensor:
    """The clean LR of ``x`` (not quantised): antialiased bicubic to 1/scale, as the
    no-degradation samples and the stage-1 anchor at 0."""
    size = (x.shape[-2] // scale, x.shape[-1] // scale)
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def upsample(lr: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """``F.interpolate(lr, size, mode, align_corners=False)`` clamped to [0, 1]; the modes
    :func:`resize_matrices` covers run as two matrix products (faster than the bicubic kernel)."""
    if mode not in RESIZE_MODES:
        return F.interpolate(lr, size=size, mode=mode).clamp(0, 1)
    mode_id = ops.constant([RESIZE_MODES.index(mode)], torch.long, lr.device)
    rh, rw = (resize_matrices(ops.constant([n_in], torch.long, lr.device),
                              ops.constant([n_out], torch.long, lr.device), mode_id, n_in, n_out,
                              lr.dtype)[0] for n_in, n_out in zip(lr.shape[-2:], size))
    return torch.matmul(rh, torch.matmul(lr, rw.T)).clamp_(0, 1)
