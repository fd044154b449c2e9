"""Tiled processing for large images (METHOD.md, "Inference").

* :func:`tiled_latent_apply` -- latent tiles (default 96 latent px, overlap 32) through any
  ``fn`` (the UNet's ε prediction, or the whole ``denoise``), blended with Gaussian weights
  normalised by their sum.
* :func:`tiled_encode` / :func:`tiled_decode` -- the same overlap-and-blend scheme around the VAE
  encoder / decoder, so that peak memory depends on the tile size, not on the image size.
* :func:`pad_to_multiple` / :func:`crop_to` -- pad (bottom/right) to a multiple of 64 and crop
  back.

Tiling. Along each axis of length ``n`` with tile ``t`` and overlap ``o`` the tiles start at
``0, s, 2s, ...`` (stride ``s = t - o``) while the tile stays inside, and the last tile is aligned
to the border (starts at ``n - t``), so every tile has the full size ``t`` and the last overlap is
at least ``o``. An axis with ``n <= t`` is one tile of size ``n``. When the whole input is one
tile, ``fn`` is called once on the whole input and its output is returned as is (exactly).

Blending. Each tile's output is weighted by a separable Gaussian centred on the tile
(:func:`gaussian_weights`, σ = ``sigma_frac`` × tile size per axis, 0.1 as in the reference S3Diff /
Mixture-of-Diffusers), and the accumulated sum is divided by the accumulated weight. So any ``fn``
that commutes with cropping (pointwise functions, the identity) is reproduced exactly, up to
float rounding, and a per-tile offset ``c_i`` produces no seam: with two or more tiles the output
is a convex combination ``Σ p_i c_i`` whose gradient along x is ``Cov_p(c, ∂x log w)``, at most
``(max c - min c) · (t - 1) / (4 σ²)`` per pixel (≈ 0.26·Δc for t = 96, σ = 9.6), plus the tiny
jump where a truncated Gaussian (weight ``exp(-(t-1)²/(8σ²))`` ≈ 5e-6 of its peak at the tile's
edge) enters.

VAE approximation. The reference (S3Diff's ``vaehook``) splits the VAE into its layers and
synchronises GroupNorm statistics across tiles, which makes tiled and untiled results almost
identical. Here each tile goes through the *unmodified* encoder / decoder: GroupNorm statistics,
the mid-block self-attention and zero padding at the tile borders are per tile, so a tiled result
differs from the untiled one (most near tile borders, which the Gaussian weights play down); the
blending removes visible seams but not the tile-to-tile statistics differences. Use large tiles
(the image-space tile should be ≥ ~512 px for SD's VAE) with generous overlap.

Memory. Tiles run one at a time with the full batch B (so per-sample state, e.g. the degradation
modulation of the LoRA layers, stays valid); the accumulators are float32 (float64 if the output
is float64) of the output's size.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["gaussian_weights", "tile_starts", "tiled_latent_apply", "tiled_encode",
           "tiled_decode", "pad_to_multiple", "crop_to"]

TensorFn = Callable[[torch.Tensor], torch.Tensor]

# weights never fall below this (relative to the peak 1): no 0/0 where only far tails cover a
# pixel, whatever sigma_frac
_MIN_WEIGHT = 1e-30


def gaussian_weights(h: int, w: int, sigma_frac: float = 0.1, *,
                     device: Optional[torch.device | str] = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(h, w)`` separable Gaussian, peak 1 at the centre ``((h-1)/2, (w-1)/2)``,
    σ = ``sigma_frac`` × h (rows) and × w (columns); floored at 1e-30."""
    if h < 1 or w < 1:
        raise ValueError(f"tile size must be positive, got {h}x{w}")
    if not sigma_frac > 0:
        raise ValueError(f"sigma_frac must be > 0, got {sigma_frac}")

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        s = sigma_frac * n
        return torch.exp(-((x - (n - 1) / 2.0) ** 2) / (2.0 * s * s))

    g = axis(h)[:, None] * axis(w)[None, :]
    return g.clamp_min(_MIN_WEIGHT).to(device=device, dtype=dtype)


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles along an axis of length ``n`` (see the module docstring)."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _tiled(fn: TensorFn, x: torch.Tensor, tile: int, overlap: int, u_in: int, u_out: int,
           sigma_frac: float) -> torch.Tensor:
    """Core: ``x`` (B, C, H, W) with H, W multiples of ``u_in``; tiles and strides counted in
    grid units (``u_in`` input px = ``u_out`` output px); ``fn`` maps a tile of ``k·u_in`` px to
    ``k·u_out`` px."""
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % u_in or W % u_in:
        raise ValueError(f"size {H}x{W} must be a multiple of {u_in} (pad first)")
    gh, gw = H // u_in, W // u_in
    ys, xs = tile_starts(gh, tile, overlap), tile_starts(gw, tile, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)
    th, tw = min(tile, gh), min(tile, gw)
    weight = None
    acc = wsum = None
    out_dtype = None
    for y0 in ys:
        for x0 in xs:
            part = x[..., y0 * u_in:(y0 + th) * u_in, x0 * u_in:(x0 + tw) * u_in]
            res = fn(part)
            want = (th * u_out, tw * u_out)
            if res.dim() != 4 or tuple(res.shape[-2:]) != want or res.shape[0] != x.shape[0]:
                raise ValueError(f"fn returned shape {tuple(res.shape)} for a tile of "
                                 f"{tuple(part.shape)}; expected (B, C', {want[0]}, {want[1]})")
            if acc is None:
                out_dtype = res.dtype
                acc_dtype = torch.promote_types(res.dtype, torch.float32)
                acc = torch.zeros(*res.shape[:2], gh * u_out, gw * u_out, dtype=acc_dtype,
                                  device=res.device)
                wsum = torch.zeros(gh * u_out, gw * u_out, dtype=acc_dtype, device=res.device)
                weight = gaussian_weights(*want, sigma_frac, device=res.device, dtype=acc_dtype)
            sl = (slice(y0 * u_out, (y0 + th) * u_out), slice(x0 * u_out, (x0 + tw) * u_out))
            acc[(..., *sl)] += res.to(acc.dtype) * weight
            wsum[sl] += weight
            del res
    return (acc / wsum).to(out_dtype)


def tiled_latent_apply(fn: TensorFn, z: torch.Tensor, tile: int = 96, overlap: int = 32, *,
                       sigma_frac: float = 0.1) -> torch.Tensor:
    """Apply ``fn`` ((B, C, h, w) -> (B, C', h, w), same spatial size) to overlapping
    ``tile``×``tile`` tiles of the latent ``z`` (B, C, H, W) and blend them with Gaussian
    weights normalised by their sum. With H, W <= ``tile``: exactly ``fn(z)`` (one call)."""
    return _tiled(fn, z, tile, overlap, 1, 1, sigma_frac)


def tiled_decode(vae_decode_fn: TensorFn, z: torch.Tensor, tile_lat: int = 96,
                 overlap_lat: int = 32, factor: int = 8, *,
                 sigma_frac: float = 0.1) -> torch.Tensor:
    """Decoder over latent tiles of ``tile_lat`` (overlap ``overlap_lat``) latent px;
    ``vae_decode_fn`` maps (B, C, h, w) latents to (B, 3, h·factor, w·factor) images (e.g.
    ``lambda t: vae.decode(t / scaling_factor).sample``); blending in image space. One tile
    covering ``z``: exactly ``vae_decode_fn(z)``. See the module docstring for the
    approximation."""
    return _tiled(vae_decode_fn, z, tile_lat, overlap_lat, 1, factor, sigma_frac)


def tiled_encode(vae_encode_fn: TensorFn, x: torch.Tensor, tile_px: int = 768,
                 overlap_px: int = 256, factor: int = 8, *,
                 sigma_frac: float = 0.1) -> torch.Tensor:
    """Encoder over image tiles of ``tile_px`` (overlap ``overlap_px``) px, both multiples of
    ``factor``; x's H, W too. ``vae_encode_fn`` maps (B, 3, h, w) to (B, C, h/factor, w/factor)
    (e.g. ``lambda t: vae.encode(t).latent_dist.parameters``, the moments, or the mean);
    blending in latent space. One tile covering ``x``: exactly ``vae_encode_fn(x)``."""
    if tile_px % factor or overlap_px % factor:
        raise ValueError(f"tile_px ({tile_px}) and overlap_px ({overlap_px}) must be multiples "
                         f"of the VAE factor {factor}")
    return _tiled(vae_encode_fn, x, tile_px // factor, overlap_px // factor, factor, 1,
                  sigma_frac)


# --------------------------------------------------------------------------- padding

def _pad_axis(x: torch.Tensor, amount: int, dim: int, mode: str) -> torch.Tensor:
    """Pad the end of ``dim`` (-1 or -2) of a 4-D tensor by ``amount``."""
    if amount <= 0:
        return x
    if mode == "constant":
        pad = (0, amount, 0, 0) if dim == -1 else (0, 0, 0, amount)
        return F.pad(x, pad, mode="constant", value=0.0)
    if mode == "reflect" and x.shape[dim] > 1:
        # repeated reflection (torch's reflect needs pad < size): the mirrored periodic
        # extension, period 2(n - 1)
        while amount > 0:
            step = min(amount, x.shape[dim] - 1)
            pad = (0, step, 0, 0) if dim == -1 else (0, 0, 0, step)
            x = F.pad(x, pad, mode="reflect")
            amount -= step
        return x
    # replicate (or reflect of a size-1 axis, where it is the only sensible choice)
    pad = (0, amount, 0, 0) if dim == -1 else (0, 0, 0, amount)
    return F.pad(x, pad, mode="replicate")


def pad_to_multiple(x: torch.Tensor, m: int, mode: str = "reflect"
                    ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two dims of ``x`` (..., H, W) at the bottom/right up to multiples of ``m``.

    ``mode``: "reflect" (mirror without repeating the edge; pads longer than the size use the
    repeated-mirror extension, a size-1 axis is replicated), "replicate" or "constant" (zeros).
    Returns ``(x_padded, (H, W))``; ``x`` itself when nothing needs padding. Undo with
    :func:`crop_to`."""
    if m < 1:
        raise ValueError(f"multiple must be >= 1, got {m}")
    if mode not in ("reflect", "replicate", "constant"):
        raise ValueError(f"pad mode must be reflect, replicate or constant, got {mode!r}")
    if x.dim() < 2:
        raise ValueError(f"expected (..., H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    ph, pw = -h % m, -w % m
    if ph == 0 and pw == 0:
        return x, (h, w)
    lead = x.shape[:-2]
    y = x.reshape(1, -1, h, w)
    y = _pad_axis(_pad_axis(y, pw, -1, mode), ph, -2, mode)
    return y.reshape(*lead, h + ph, w + pw), (h, w)


def crop_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Top-left ``h``×``w`` of ``x`` (..., H, W) (a view)."""
    if h > x.shape[-2] or w > x.shape[-1]:
        raise ValueError(f"cannot crop {tuple(x.shape[-2:])} to {h}x{w}")
    return x[..., :h, :w]
