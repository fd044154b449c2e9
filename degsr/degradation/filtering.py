"""Filtering a batch with one kernel per sample (the engine's blurs): direct correlation
(kornia's ``filter2d``, reflect padding), on the CPU in bands of rows when the call has few
planes, by FFT on accelerators for the wide kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from degsr.degradation.ops import on_accelerator


FFT_MIN_KERNEL = 11  # from this kernel width on, accelerators filter by FFT


def _fft_length(n: int) -> int:
    """The smallest length >= ``n`` whose prime factors are all <= 7 (fast for cuFFT/pocketfft)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft_filter(images: Tensor, kernels: Tensor) -> Tensor:
    """:func:`filter_per_sample` with reflect padding, by FFT: the padded image's spectrum times
    the conjugate spectrum of the kernel (cross-correlation). The transform covers the padded
    image, so no output pixel wraps around; the cost does not depend on the kernel size."""
    h, w = images.shape[-2:]
    r = kernels.shape[-1] // 2
    padded = F.pad(images, (r, r, r, r), mode="reflect")
    size = (_fft_length(h + 2 * r), _fft_length(w + 2 * r))
    spectrum = torch.fft.rfft2(padded, s=size)
    spectrum *= torch.fft.rfft2(kernels.to(images.dtype), s=size).conj_physical().unsqueeze(1)
    return torch.fft.irfft2(spectrum, s=size)[..., :h, :w].contiguous()


def filter_per_sample(images: Tensor, kernels: Tensor) -> Tensor:
    """Blur each sample of ``images`` ``(B, C, H, W)`` with its own kernel ``(B, k, k)``.

    Cross-correlation with reflect padding (``kornia.filters.filter2d``); the kernels here are
    point-symmetric, so this equals convolution. Images no wider than ``k // 2`` (tiny crops)
    are padded by replication instead. On accelerators, kernels of width >= ``FFT_MIN_KERNEL``
    go through :func:`fft_filter` (equal up to float rounding; there the direct depthwise
    convolution is the slowest step of the engine, on the CPU the FFT gained little). On the
    CPU, few planes are filtered in strips (:func:`_strips`).
    """
    from kornia.filters import filter2d

    b, c, h, w = images.shape
    k = kernels.shape[-1]
    accelerator = on_accelerator(images.device)
    if accelerator and k >= FFT_MIN_KERNEL and min(h, w) >= 2 * k:
        return fft_filter(images, kernels)
    kernels = kernels.to(images.dtype)
    if min(h, w) <= k // 2:  # reflect needs a wider image
        return filter2d(images, kernels, border_type="replicate")
    n = 1 if accelerator else _strips(images, k)
    if n < 2:
        return filter2d(images, kernels, border_type="reflect")
    # each sample's padded image cut into n bands of rows (with their k - 1 rows of overlap):
    # n times the planes, the same sums for every output pixel (bit-identical)
    r, rows = k // 2, -(-h // n)
    padded = F.pad(images, (r, r, r, r), mode="reflect")
    padded = F.pad(padded, (0, 0, 0, rows * n + 2 * r - padded.shape[-2]))  # the last band's rest
    bands = padded.unfold(2, rows + 2 * r, rows).permute(0, 2, 1, 4, 3)  # (b, n, c, rows+2r, w+2r)
    out = filter2d(bands.reshape(b * n, c, rows + 2 * r, w + 2 * r),
                   kernels.repeat_interleave(n, dim=0), padding="valid")
    return out.view(b, n, c, rows, w).transpose(1, 2).reshape(b, c, n * rows, w)[:, :, :h]


def _strips(images: Tensor, k: int) -> int:
    """How many bands of rows :func:`filter_per_sample` cuts each image into on the CPU. oneDNN's
    depthwise convolution works on 16 planes at once (one AVX-512 vector) per thread: one RGB
    image alone leaves 13 of 16 lanes idle and runs ~5x slower per pixel than a batch of 16
    (docs/benchmarks.md, session 10). Bands fill the lanes; each stays at least ``k - 1`` rows
    tall, so the overlap at most doubles the work."""
    b, c, h = images.shape[:3]
    return min(16 * torch.get_num_threads() // (b * c), h // max(k - 1, 1))
