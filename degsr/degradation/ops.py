"""Per-sample random draws and the pixel operations of the degradation: noise, sharpening.

(JPEG lives in :mod:`degsr.degradation.jpeg`.)

Every draw takes an explicit ``torch.Generator`` and happens on its device; parameters are (B,)
tensors so each sample gets its own.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from kornia.color import rgb_to_grayscale
from kornia.filters import gaussian_blur2d
from torch import Tensor

from degsr.degradation.poisson import rows_for, sample_counts

POISSON_LEVELS = 256.0  # typical level count of a photo crop (> 128 distinct values): scores use it


_CONSTANTS: dict[tuple, Tensor] = {}


def constant(values, dtype: torch.dtype, device) -> Tensor:
    """A small constant (numbers, nested lists or a module-level tensor) on ``device``, uploaded
    once per process: on an accelerator every host-to-device copy waits for the queue."""
    key = (id(values) if isinstance(values, Tensor) else repr(values), dtype, str(device))
    if key not in _CONSTANTS:
        t = values if isinstance(values, Tensor) else torch.tensor(values)
        _CONSTANTS[key] = t.to(device=device, dtype=dtype)
    return _CONSTANTS[key]


def uniform(g: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return torch.rand(n, generator=g, device=g.device) * (hi - lo) + lo


def bernoulli(g: torch.Generator, n: int, p: float) -> Tensor:
    return torch.rand(n, generator=g, device=g.device) < p


def categorical(g: torch.Generator, n: int, probs) -> Tensor:
    """(n,) long indices drawn with the given probabilities."""
    p = constant(list(probs), torch.float32, g.device)
    return torch.multinomial(p.expand(n, -1), 1, replacement=True, generator=g).view(n)


def scale_factors(g: torch.Generator, n: int, probs, span) -> tuple[Tensor, Tensor]:
    """Resize factors: up from U[1, hi], down from U[lo, 1], keep 1 (Real-ESRGAN's rule)."""
    kind = categorical(g, n, probs)  # 0 up, 1 down, 2 keep
    up, down = uniform(g, n, 1.0, span[1]), uniform(g, n, span[0], 1.0)
    return torch.where(kind == 0, up, torch.where(kind == 1, down, torch.ones_like(up))), kind


_ACCEL: ContextVar[bool] = ContextVar("accelerator_path", default=False)


@contextmanager
def accelerator_path(on: bool = True):
    """Take the accelerator path on the CPU too (dense masks, FFT blur, ``torch.poisson``,
    larger resize groups): the same calls an accelerator gets, to count them where none is
    at hand (``experiments/engine_ops.py``)."""
    token = _ACCEL.set(on)
    try:
        yield
    finally:
        _ACCEL.reset(token)


def on_accelerator(device: torch.device) -> bool:
    """Whether the engine takes its accelerator path on ``device``: every choice of it that
    depends on the device asks here (see :func:`accelerator_path`)."""
    return device.type != "cpu" or _ACCEL.get()


_DENSE: ContextVar[bool | None] = ContextVar("dense_masks", default=None)


@contextmanager
def dense_masks(dense: bool | None):
    """Force (True/False) or restore (None: by device) the dense way of the masked operations."""
    token = _DENSE.set(dense)
    try:
        yield
    finally:
        _DENSE.reset(token)


def is_dense(x: Tensor) -> bool:
    """Whether masked operations on ``x`` run dense: every sample computed, the mask applied by
    ``torch.where``. The default on accelerators, where finding a subset costs a host sync
    and per-subset launches cost more than the arithmetic they save; on the CPU the subset
    way (compute only the samples that need it) wins."""
    forced = _DENSE.get()
    return on_accelerator(x.device) if forced is None else forced


EVERY = slice(None)  # the index callbacks get for "every sample": views, no gathered copies


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *[1] * (like.dim() - 1))


def on_subset(mask: Tensor, x: Tensor, fn, inplace: bool = False) -> Tensor:
    """``x`` with ``fn(idx)`` (the new values of samples ``idx``, a new tensor) where ``mask``
    holds: work is spent only on the samples that need it (one host sync for the indices).
    ``inplace``: write into ``x`` itself (for a tensor the caller owns) instead of a copy. Dense
    (:func:`is_dense`): ``fn`` runs on every sample and ``torch.where`` keeps the masked ones.
    ``idx`` is :data:`EVERY` (a slice) when every sample is taken, else a tensor of indices."""
    if is_dense(x):
        return torch.where(_rows(mask, x), fn(EVERY).to(x.dtype), x)
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(EVERY)
    out = x if inplace else x.clone()
    out[idx] = fn(idx).to(out.dtype)
    return out


def split_apply(mask: Tensor, like: Tensor, on_true, on_false) -> Tensor:
    """A tensor shaped as ``like`` holding ``on_true(idx)`` for the samples where ``mask`` holds
    and ``on_false(idx)`` for the others (``on_true`` first; each only on a non-empty subset):
    the two halves are written into one new tensor, nothing is copied twice. Dense: both on
    every sample, selected by ``torch.where``."""
    if is_dense(like):
        yes = on_true(EVERY).to(like.dtype)
        return torch.where(_rows(mask, like), yes, on_false(EVERY).to(like.dtype))
    yes = mask.nonzero().flatten()
    if yes.numel() == like.shape[0]:
        return on_true(EVERY)
    no = (~mask).nonzero().flatten()
    if yes.numel() == 0:
        return on_false(EVERY)
    out = like.new_empty(like.shape)
    out[yes] = on_true(yes).to(out.dtype)
    out[no] = on_false(no).to(out.dtype)
    return out


def gaussian_noise(g: torch.Generator, x: Tensor, sigma: Tensor, gray: Tensor) -> Tensor:
    """Additive N(0, sigma/255) per sample; ``gray`` samples share one noise field over channels."""
    b, c, h, w = x.shape
    noise = split_apply(~gray, x, lambda i: torch.randn(
        (x[i].shape[0], c, h, w), generator=g, device=g.device, dtype=x.dtype), lambda i: torch.randn(
        (x[i].shape[0], 1, h, w), generator=g, device=g.device, dtype=x.dtype).expand(-1, c, -1, -1))
    return noise * (sigma.view(-1, 1, 1, 1).to(x.dtype) / 255.0)


def poisson_levels(v255: Tensor) -> Tensor:
    """The reference's per-sample level count: 2**ceil(log2(#distinct values)), vectorised.

    ``v255`` holds integers 0..255 (B, C, H, W); returns (B, 1, 1, 1).
    """
    b = v255.shape[0]
    flat = v255.reshape(b, -1).long()
    seen = torch.zeros(b, 256, device=v255.device, dtype=torch.int32)
    seen.scatter_(1, flat, 1)  # presence, not counts: no atomic adds piling on a few bins
    distinct = seen.sum(1).clamp(min=1).to(v255.dtype)
    return torch.exp2(torch.ceil(torch.log2(distinct))).view(b, 1, 1, 1)


def poisson_noise(g: torch.Generator, x: Tensor, scale: Tensor, gray: Tensor,
                  active: Tensor | None = None) -> Tensor:
    """Signal-dependent noise: (Poisson(L v) / L - v) * scale, v the image on the 1/255 grid and
    L = 2**ceil(log2(#distinct values of v)) per sample (256 for most photo crops), as the
    reference (on the CPU drawn by table inversion, :mod:`degsr.degradation.poisson`; elsewhere
    by ``torch.poisson``). ``gray`` samples
    draw it once on the luma and repeat it over the channels. ``active`` (B,): the samples whose
    noise is used (the others get some values at the cost of Poisson(0) draws: the dense way).
    """
    def shot(v: Tensor, use: Tensor) -> Tensor:
        q = (v * 255.0).round().clamp(0, 255)
        levels = poisson_levels(q)
        drawn = q * _rows(use, q)  # unused samples draw Poisson(0): nearly free on accelerators
        if not on_accelerator(q.device):  # torch.poisson: a serial per-element sampler on CPUs
            counts = sample_counts(rows_for(drawn, levels), g).to(q.dtype)  # ~ Poisson(L q / 255)
        else:  # parallel on accelerators (and MPS has no float64 for the tables)
            counts = torch.poisson(drawn / 255.0 * levels, generator=g)
        return counts / levels - q / 255.0

    use = torch.ones_like(gray) if active is None else active
    noise = split_apply(~gray, x, lambda i: shot(x[i], use[i] & ~gray[i]), lambda i: shot(
        rgb_to_grayscale(x[i]), use[i] & gray[i]).expand(-1, x.shape[1], -1, -1))
    return noise * scale.view(-1, 1, 1, 1).to(x.dtype)


def usm_sharpen(x: Tensor, weight: float, threshold: float, radius: int, sigma: float) -> Tensor:
    """Unsharp masking as Real-ESRGAN sharpens its HR targets (threshold in 1/255 units). The
    Gaussian (radius x radius, reflect padding) runs as two 1-D passes: 2 x 51 taps a pixel
    instead of 51², the same blur up to float rounding (CPU-2, 16 x 3 x 256²: 50 vs 367 ms).
    Images no wider than ``radius // 2`` are padded by replication (reflect needs more)."""
    border = "reflect" if min(x.shape[-2:]) > radius // 2 else "replicate"

    def blur(t: Tensor) -> Tensor:
        return gaussian_blur2d(t, (radius, radius), (sigma, sigma), border_type=border, separable=True)

    residual = x - blur(x)
    mask = (residual.abs() * 255.0 > threshold).to(x.dtype)
    soft = blur(mask)
    sharp = (x + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * x


def sinc_equivalent_sigma(omega_c: Tensor) -> Tensor:
    """Std of the Gaussian whose frequency response halves at ω_c: sqrt(2 ln 2) / ω_c."""
    return math.sqrt(2 * math.log(2)) / omega_c
