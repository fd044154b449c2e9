"""Colour fix, latent/VAE tiling and padding (degsr.inference): closed-form / independent checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from degsr.inference import (adain_color_fix, color_fix, crop_to, gaussian_weights,
                             pad_to_multiple, tile_starts, tiled_decode, tiled_encode,
                             tiled_latent_apply, wavelet_color_fix)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- helpers

def _atrous_np(img: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 à-trous decomposition of (..., H, W): explicit sum of the 9 shifted
    copies (clamped indices = replicate padding) per level; returns (high, low)."""
    k = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64) / 16.0
    h, w = img.shape[-2:]
    low = img.astype(np.float64)
    for lvl in range(levels):
        d = 2 ** lvl
        nxt = np.zeros_like(low)
        for a, b in itertools.product(range(3), range(3)):
            rows = np.clip(np.arange(h) + (a - 1) * d, 0, h - 1)
            cols = np.clip(np.arange(w) + (b - 1) * d, 0, w - 1)
            nxt += k[a, b] * low[..., rows[:, None], cols[None, :]]
        low = nxt
    return img - low, low


def _smooth_and_checker(b=2, h=96, w=96, amp=0.05):
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    ref = np.stack([0.2 + 0.6 * xx, 0.8 - 0.5 * yy, 0.3 + 0.3 * xx + 0.2 * yy])  # linear ramps
    ref = np.stack([ref * (1.0 - 0.1 * i) for i in range(b)])
    checker = amp * np.where((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0, 1.0, -1.0)
    return ref, np.broadcast_to(checker, ref.shape).copy()


def _dx(a: torch.Tensor) -> torch.Tensor:
    return (a[..., :, 1:] - a[..., :, :-1]).abs()


def _dy(a: torch.Tensor) -> torch.Tensor:
    return (a[..., 1:, :] - a[..., :-1, :]).abs()


# --------------------------------------------------------------------------- colour fix

def test_wavelet_color_fix_matches_independent_atrous():
    ref, checker = _smooth_and_checker()
    out = ref + checker
    expected = _atrous_np(out, 5)[0] + _atrous_np(ref, 5)[1]
    got = wavelet_color_fix(torch.from_numpy(out).float(), torch.from_numpy(ref).float())
    assert got.dtype == torch.float32 and got.shape == out.shape
    np.testing.assert_allclose(got.double().numpy(), expected, atol=2e-6)
    got64 = wavelet_color_fix(torch.from_numpy(out), torch.from_numpy(ref))
    np.testing.assert_allclose(got64.numpy(), expected, atol=1e-12)
    # the dispatcher: wavelet is the default mode, (out, ref) in that order, levels passed on
    np.testing.assert_allclose(color_fix(torch.from_numpy(out), torch.from_numpy(ref)).numpy(),
                               expected, atol=1e-12)
    np.testing.assert_allclose(
        color_fix(torch.from_numpy(out), torch.from_numpy(ref), "wavelet", levels=3).numpy(),
        _atrous_np(out, 3)[0] + _atrous_np(ref, 3)[1], atol=1e-12)
    # other level counts go through the same decomposition
    np.testing.assert_allclose(
        wavelet_color_fix(torch.from_numpy(out), torch.from_numpy(ref), levels=2).numpy(),
        _atrous_np(out, 2)[0] + _atrous_np(ref, 2)[1], atol=1e-12)


def test_wavelet_color_fix_keeps_detail_and_takes_reference_colour():
    ref, checker = _smooth_and_checker()
    shift = np.array([0.3, -0.2, 0.1])[None, :, None, None]  # a colour cast of the output
    out = ref + checker + shift
    got = wavelet_color_fix(torch.from_numpy(out), torch.from_numpy(ref)).numpy()
    # the kernel sums to 1 with replicate padding: a constant cast goes entirely into low(out)
    clean = wavelet_color_fix(torch.from_numpy(ref + checker), torch.from_numpy(ref)).numpy()
    np.testing.assert_allclose(got, clean, atol=1e-12)
    # interior (further than 1+2+4+8+16 = 31 px from the border): the binomial blur keeps
    # linear ramps and removes the ±1 checkerboard exactly -> ref + checker, cast removed
    m = 32
    np.testing.assert_allclose(got[..., m:-m, m:-m], (ref + checker)[..., m:-m, m:-m],
                               atol=1e-12)
    # everywhere: low(ref) + high(checker) stays close to ref + checker
    assert np.abs(got - (ref + checker)).max() < 0.05


def test_color_fix_identity_and_none_and_range_equivariance():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 56)
    for mode in ("wavelet", "adain"):
        torch.testing.assert_close(color_fix(x, x, mode), x, atol=1e-5, rtol=0)
    out = torch.rand(2, 3, 40, 56)
    assert color_fix(out, x, "none") is out
    # [0, 1] and [-1, 1] give the same fix (affine equivariance)
    for mode in ("wavelet", "adain"):
        a = color_fix(out, x, mode)
        b = color_fix(out * 2 - 1, x * 2 - 1, mode)
        torch.testing.assert_close(b, a * 2 - 1, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        color_fix(out, x, "histogram")
    with pytest.raises(ValueError):
        color_fix(out, x[..., :20], "wavelet")


def test_adain_closed_form():
    g = torch.Generator().manual_seed(1)
    out = torch.rand(2, 3, 24, 32, generator=g, dtype=torch.float64) * 0.5 + 0.4
    ref = torch.rand(2, 3, 24, 32, generator=g, dtype=torch.float64) * 1.5 - 0.9
    eps = 1e-5
    o, r = out.numpy(), ref.numpy()
    mo, so = o.mean(axis=(2, 3), keepdims=True), o.var(axis=(2, 3), keepdims=True)
    mr, sr = r.mean(axis=(2, 3), keepdims=True), r.var(axis=(2, 3), keepdims=True)
    expected = (o - mo) / np.sqrt(so + eps) * np.sqrt(sr + eps) + mr
    got = adain_color_fix(out, ref).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # the dispatcher hands over (out, ref) in that order
    np.testing.assert_allclose(color_fix(out, ref, "adain").numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(got.mean(axis=(2, 3)), r.mean(axis=(2, 3)), atol=1e-12)
    # std matched up to eps: std_got = std_r * std_o / sqrt(var_o + eps)
    np.testing.assert_allclose(got.std(axis=(2, 3)), r.std(axis=(2, 3)), rtol=2e-3)
    # float32 in, float32 out
    assert adain_color_fix(out.float(), ref.float()).dtype == torch.float32


# --------------------------------------------------------------------------- latent tiling

def test_tile_starts_and_weights():
    assert tile_starts(200, 96, 32) == [0, 64, 104]
    assert tile_starts(150, 96, 32) == [0, 54]
    assert tile_starts(96, 96, 32) == [0] and tile_starts(40, 96, 32) == [0]
    assert tile_starts(97, 96, 32) == [0, 1]
    with pytest.raises(ValueError):
        tile_starts(200, 96, 96)
    g = gaussian_weights(96, 64, sigma_frac=0.1)
    assert g.shape == (96, 64) and float(g.max()) <= 1.0
    # separable, symmetric, σ = 0.1 × size per axis
    c = torch.arange(64, dtype=torch.float64)
    col = torch.exp(-((c - 31.5) ** 2) / (2 * 6.4 ** 2))
    torch.testing.assert_close(g[47].double() / g[47].double().max(), col / col.max(),
                               rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(g, g.flip(0).flip(1))


def test_tiled_latent_single_tile_is_exactly_fn():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 64, 96)
    calls = []

    def fn(t):
        calls.append(tuple(t.shape))
        return torch.tanh(t * 3.0) + t.mean()  # non-local: tiling would change it

    got = tiled_latent_apply(fn, z, tile=96, overlap=32)
    assert calls == [(2, 4, 64, 96)]
    assert torch.equal(got, fn(z))


@pytest.mark.parametrize("shape", [(200, 150), (97, 300), (130, 40)])
def test_tiled_latent_identity_and_pointwise(shape):
    torch.manual_seed(0)
    z = torch.randn(2, 4, *shape)
    calls = []

    def ident(t):
        calls.append(tuple(t.shape[-2:]))
        return t

    torch.testing.assert_close(tiled_latent_apply(ident, z, 96, 32), z, atol=1e-6, rtol=1e-6)
    assert len(calls) == len(tile_starts(shape[0], 96, 32)) * len(tile_starts(shape[1], 96, 32))
    assert len(calls) > 1 and all(c == (min(96, shape[0]), min(96, shape[1])) for c in calls)
    # pointwise, and a channel count that differs from the input's
    fn = lambda t: torch.cat([2 * t + 1, t ** 2], dim=1)  # noqa: E731
    torch.testing.assert_close(tiled_latent_apply(fn, z, 96, 32), fn(z), atol=1e-5, rtol=1e-5)
    # float64 stays float64 and exact to rounding
    z64 = z.double()
    torch.testing.assert_close(tiled_latent_apply(ident, z64, 96, 32), z64, atol=1e-12,
                               rtol=0)


def test_tiled_latent_per_tile_offsets_have_no_seams():
    """fn adds a different constant c_i to each tile. The blended output Σ p_i c_i has x-gradient
    Cov_p(c, ∂x log w) with ∂x log w_i = -(x - m_i)/σ²; tiles covering one pixel have centres at
    most t-1 apart, so by Popoviciu |grad| <= (Δc/2)·((t-1)/σ²)/2 = Δc (t-1) / (4σ²)."""
    t, o, frac = 96, 32, 0.1
    z = torch.zeros(1, 1, 200, 150, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    offsets = torch.rand(100, generator=g, dtype=torch.float64)
    offsets[0], offsets[1] = 0.0, 1.0  # make sure neighbours differ by a lot
    k = iter(range(100))
    used = []

    def fn(tile):
        c = offsets[next(k)]
        used.append(float(c))
        return tile + c

    out = tiled_latent_apply(fn, z, t, o, sigma_frac=frac)
    dc = max(used) - min(used)
    sigma = frac * t
    bound = dc * (t - 1) / (4 * sigma ** 2)  # ≈ 0.258 Δc
    slack = 1e-3 * dc  # the truncated Gaussians' edge weight (~5e-6 of the peak)
    gx, gy = float(_dx(out).max()), float(_dy(out).max())
    assert gx <= bound + slack and gy <= bound + slack, (gx, gy, bound)
    # without blending (each pixel from one tile) the jump would be a full offset difference
    assert bound < 0.3 * dc
    # and the output is a convex combination of the offsets
    assert float(out.min()) >= min(used) - 1e-12 and float(out.max()) <= max(used) + 1e-12


# --------------------------------------------------------------------------- tiled VAE

@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64],
                        layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=64)
    return vae.eval()


def _codec(vae):
    """The VAE's encode (posterior mean) and decode as plain functions."""
    return (lambda x: vae.encode(x).latent_dist.mean), (lambda z: vae.decode(z).sample)


def _smooth_image(h, w):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return (0.8 * torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy - xx),
                               2 * xx * yy - 1]))[None]


@torch.no_grad()
def test_tiled_vae_single_tile_is_exact(tiny_vae):
    enc, dec = _codec(tiny_vae)
    img = _smooth_image(64, 48)
    z = enc(img)
    assert torch.equal(tiled_encode(enc, img, tile_px=64, overlap_px=32, factor=2), z)
    assert torch.equal(tiled_decode(dec, z, tile_lat=32, overlap_lat=16, factor=2), dec(z))
    with pytest.raises(ValueError):
        tiled_encode(enc, img, tile_px=63, overlap_px=32, factor=2)


@torch.no_grad()
def test_tiled_vae_close_to_untiled_without_seams(tiny_vae):
    enc, dec = _codec(tiny_vae)
    img = _smooth_image(128, 128)
    z = enc(img)
    x = dec(z)
    # 2×2 tiles: latent tiles of 48 (96 px) with overlap 16 (32 px) on a 64×64 latent
    ze = tiled_encode(enc, img, tile_px=96, overlap_px=32, factor=2)
    xt = tiled_decode(dec, z, tile_lat=48, overlap_lat=16, factor=2)
    enc_rel = float((ze - z).abs().mean() / z.std())
    dec_rel = float((xt - x).abs().mean() / x.std())
    print(f"\ntiled vs untiled (random tiny VAE): encode mean|Δ| = {float((ze - z).abs().mean()):.4f}"
          f" (max {float((ze - z).abs().max()):.3f}, z std {float(z.std()):.3f}); decode mean|Δ| ="
          f" {float((xt - x).abs().mean()):.4f} (max {float((xt - x).abs().max()):.3f},"
          f" x std {float(x.std()):.3f})")
    # per-tile GroupNorm / attention / zero padding make a random-weight VAE differ: loose bound
    assert enc_rel < 0.3 and dec_rel < 0.3, (enc_rel, dec_rel)
    # no seam: at the tile edges (latent tiles [0, 48) and [16, 64) -> px 32 and 96) the step
    # between neighbouring pixels is no larger than the steps next to it in the same row
    # (a seam is a local spike); hard stitching (no blending) of the same tiles is flagged
    def spike(g, e):  # g: (..., rows, steps); excess of step e over steps e-4..e+4 (not e)
        nb = torch.cat([g[..., e - 4:e], g[..., e + 1:e + 5]], -1).amax(-1)
        return float((g[..., e] - nb).max())

    for e in (31, 95):
        assert spike(_dx(xt), e) < 0.05 and spike(_dy(xt).transpose(-1, -2), e) < 0.05
    hard = torch.cat([dec(z[..., :48])[..., :64], dec(z[..., 16:])[..., 32:]], -1)
    assert spike(_dx(hard), 63) > 0.2
    assert float(_dx(xt).max()) <= 1.1 * float(_dx(x).max())
    assert float(_dy(xt).max()) <= 1.1 * float(_dy(x).max())


# --------------------------------------------------------------------------- pad / crop

def test_pad_crop_round_trip_and_reflect_values():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 37, 50)
    xp, (h, w) = pad_to_multiple(x, 64)
    assert xp.shape == (2, 3, 64, 64) and (h, w) == (37, 50)
    assert torch.equal(crop_to(xp, h, w), x)
    np.testing.assert_array_equal(xp.numpy(), np.pad(x.numpy(), ((0, 0), (0, 0), (0, 27),
                                                                  (0, 14)), mode="reflect"))
    same, hw = pad_to_multiple(torch.rand(1, 3, 64, 128), 64)
    assert hw == (64, 128) and same.shape == (1, 3, 64, 128)
    # 3-D input (C, H, W) and other modes
    y = torch.rand(3, 5, 7)
    yp, _ = pad_to_multiple(y, 8, mode="replicate")
    np.testing.assert_array_equal(yp.numpy(), np.pad(y.numpy(), ((0, 0), (0, 3), (0, 1)),
                                                     mode="edge"))
    yc, _ = pad_to_multiple(y, 8, mode="constant")
    assert float(yc[:, 5:].abs().sum()) == 0.0 and torch.equal(crop_to(yc, 5, 7), y)


def test_reflect_pad_larger_than_the_size():
    x = torch.arange(15, dtype=torch.float32).reshape(1, 1, 5, 3)
    xp, hw = pad_to_multiple(x, 16)  # pads 11 > 5 rows and 13 > 3 columns
    assert xp.shape == (1, 1, 16, 16) and hw == (5, 3)

    def mirror(i, n):  # the mirrored periodic extension, period 2(n-1)
        r = i % (2 * (n - 1))
        return r if r < n else 2 * (n - 1) - r

    expected = np.array([[x[0, 0, mirror(i, 5), mirror(j, 3)].item() for j in range(16)]
                         for i in range(16)])
    np.testing.assert_array_equal(xp[0, 0].numpy(), expected)
    np.testing.assert_array_equal(xp[0, 0].numpy(), np.pad(x[0, 0].numpy(), ((0, 11), (0, 13)),
                                                            mode="reflect"))
    # a size-1 axis cannot be mirrored: replicated
    one = torch.rand(1, 3, 1, 5)
    op, _ = pad_to_multiple(one, 8)
    assert op.shape == (1, 3, 8, 8)
    assert torch.equal(op, op[:, :, :1].expand_as(op))
    assert torch.equal(crop_to(op, 1, 5), one)


def test_tiled_latent_default_blend_is_the_gaussian_weighted_mean_of_the_tiles():
    """With the defaults (tile 96, overlap 32, sigma 0.1 x tile as in the reference) each pixel
    is sum_i w_i(p) c_i / sum_i w_i(p) over the tiles covering it, w_i a Gaussian of std 9.6
    centred on tile i: fn returns a constant c_i per tile (read from the tile's top-left value,
    so the order of the calls does not matter), the blend written out in numpy float64 with the
    tile starts of a 200 x 150 latent, [0, 64, 104] x [0, 54]."""
    h, w, t = 200, 150, 96
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    z = torch.from_numpy((ii * 1000 + jj).astype(np.float64))[None, None]

    def level(y0, x0):
        return math.sin(0.7 * y0 + 1.0) + 2.0 * math.cos(0.3 * x0)

    def fn(tile):
        corner = int(tile[0, 0, 0, 0])
        return torch.full_like(tile, level(corner // 1000, corner % 1000))

    got = tiled_latent_apply(fn, z)
    g = np.exp(-((np.arange(t) - (t - 1) / 2) ** 2) / (2 * (0.1 * t) ** 2))
    weight = np.outer(g, g)
    acc, wsum = np.zeros((h, w)), np.zeros((h, w))
    for y0 in (0, 64, 104):
        for x0 in (0, 54):
            acc[y0:y0 + t, x0:x0 + t] += weight * level(y0, x0)
            wsum[y0:y0 + t, x0:x0 + t] += weight
    np.testing.assert_allclose(got[0, 0].numpy(), acc / wsum, rtol=0, atol=1e-9)
