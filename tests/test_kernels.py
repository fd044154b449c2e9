"""Tests for degsr.degradation.kernels, each against an independent (numpy/scipy/loop) computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import j1

from degsr.degradation import filtering, kernels as K

F64 = torch.float64
TYPES = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
SAMPLE_CFG = dict(
    kernel_sizes=[7, 9, 11, 13, 15, 17, 19, 21],
    kernel_types=TYPES,
    kernel_probs=[0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    sigma_range=(0.2, 3.0),
    betag_range=(0.5, 4.0),
    betap_range=(1.0, 2.0),
    sinc_prob=0.1,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def np_grid(size):
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    return np.meshgrid(ax, ax)  # xx varies along columns


def np_reference_kernel(size, ktype, sx, sy, theta, beta, omega, pad_to=21):
    """Kernel at `size` from the Real-ESRGAN formulas in numpy float64, zero-padded to `pad_to`."""
    xx, yy = np_grid(size)
    if ktype == "sinc":
        r = np.hypot(xx, yy)
        with np.errstate(invalid="ignore", divide="ignore"):
            k = omega * j1(omega * r) / (2 * np.pi * r)
        k[r == 0] = omega**2 / (4 * np.pi)
    else:
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        inv = np.linalg.inv(rot @ np.diag([sx**2, sy**2]) @ rot.T)
        pts = np.stack([xx, yy], -1)
        q = np.einsum("...i,ij,...j->...", pts, inv, pts)
        if ktype.startswith("generalized"):
            k = np.exp(-0.5 * q**beta)
        elif ktype.startswith("plateau"):
            k = 1 / (q**beta + 1)
        else:
            k = np.exp(-0.5 * q)
    k = k / k.sum()
    p = (pad_to - size) // 2
    return np.pad(k, p)


def test_kernel_grid_orientation():
    x, y = K.kernel_grid(5)
    assert x[0].tolist() == [-2, -1, 0, 1, 2] and (x == x[0]).all()
    assert y[:, 0].tolist() == [-2, -1, 0, 1, 2] and (y.T == y[:, 0]).all()


def test_sigma_matrix_inverse_matches_numpy():
    sx, sy, th = torch.tensor([0.5, 2.0, 1.3], dtype=F64), torch.tensor([1.5, 0.7, 1.3], dtype=F64), torch.tensor([0.3, -2.0, 1.0], dtype=F64)
    got = K.sigma_matrix_inverse(sx, sy, th).numpy()
    for b in range(3):
        c, s = math.cos(th[b]), math.sin(th[b])
        rot = np.array([[c, -s], [s, c]])
        ref = np.linalg.inv(rot @ np.diag([sx[b] ** 2, sy[b] ** 2]) @ rot.T)
        np.testing.assert_allclose(got[b], ref, rtol=1e-12, atol=1e-14)


def test_all_families_sum_to_one_mixed_sizes():
    b = 6
    sx, sy = torch.linspace(0.3, 3, b, dtype=F64), torch.linspace(2.5, 0.4, b, dtype=F64)
    th, beta = torch.linspace(-3, 3, b, dtype=F64), torch.linspace(0.5, 4, b, dtype=F64)
    sizes = torch.tensor([7, 9, 13, 15, 19, 21])
    fams = [K.gaussian_family_kernels(21, sx, sy, th, beta, f) for f in ("gaussian", "generalized", "plateau")]
    fams.append(K.circular_sinc_kernels(21, torch.linspace(0.6, 3.1, b, dtype=F64)))
    for k in fams:
        for kk in (k, K.mask_to_sizes(k, sizes)):
            np.testing.assert_allclose(kk.sum((1, 2)).numpy(), 1.0, atol=1e-12)
    for k in K.sample_blur_kernels(32, gen(1), dtype=F64, **SAMPLE_CFG)[0], K.sample_sinc_kernels(32, gen(1), kernel_sizes=[7, 21], prob=0.5, dtype=F64)[0]:
        np.testing.assert_allclose(k.sum((1, 2)).numpy(), 1.0, atol=1e-12)


def test_iso_gaussian_closed_form_double_loop():
    size, sigma = 11, 1.7
    ref = np.empty((size, size))
    c = size // 2
    for i in range(size):
        for j in range(size):
            ref[i, j] = math.exp(-((j - c) ** 2 + (i - c) ** 2) / (2 * sigma**2))
    ref /= ref.sum()
    got = K.gaussian_family_kernels(size, torch.tensor([sigma], dtype=F64), torch.tensor([sigma], dtype=F64), torch.zeros(1, dtype=F64))
    np.testing.assert_allclose(got[0].numpy(), ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("sx,sy,theta", [(3.0, 1.0, 0.4), (1.2, 2.6, -2.2), (2.0, 0.8, math.pi / 2)])
def test_aniso_gaussian_second_moments(sx, sy, theta):
    k = K.gaussian_family_kernels(41, torch.tensor([sx], dtype=F64), torch.tensor([sy], dtype=F64), torch.tensor([theta], dtype=F64))[0].numpy()
    xx, yy = np_grid(41)
    m = np.array([[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    # Sampling on the integer grid shifts the variance of a narrow Gaussian slightly (~1e-4 at σ=0.8).
    np.testing.assert_allclose(m, rot @ np.diag([sx**2, sy**2]) @ rot.T, atol=1e-3)


def test_generalized_beta_one_is_gaussian_and_plateau_by_hand():
    sx, sy, th = (torch.tensor([v], dtype=F64) for v in (1.5, 0.8, 0.7))
    g = K.gaussian_family_kernels(9, sx, sy, th)
    gg = K.gaussian_family_kernels(9, sx, sy, th, torch.ones(1, dtype=F64), "generalized")
    torch.testing.assert_close(gg, g, rtol=1e-12, atol=1e-15)
    # plateau, isotropic sigma=2, beta=1.5: k ∝ 1 / ((r²/4)^1.5 + 1); compare ratios to the centre by hand.
    s2, beta = torch.tensor([2.0], dtype=F64), torch.tensor([1.5], dtype=F64)
    p = K.gaussian_family_kernels(9, s2, s2, torch.zeros(1, dtype=F64), beta, "plateau")[0]
    c = 4
    assert p[c, c + 2] / p[c, c] == pytest.approx(1 / (1.0**1.5 + 1))  # r² = 4 -> q = 1
    assert p[c + 2, c + 2] / p[c, c] == pytest.approx(1 / (2.0**1.5 + 1))  # r² = 8 -> q = 2
    assert p[c - 4, c + 3] / p[c, c] == pytest.approx(1 / (6.25**1.5 + 1))  # r² = 25 -> q = 6.25


def test_sinc_frequency_response():
    wc = math.pi / 2
    k = K.circular_sinc_kernels(21, torch.tensor([wc], dtype=F64))[0].numpy()
    n = 256
    mag = np.abs(np.fft.fft2(k, s=(n, n)))
    w = np.abs(2 * np.pi * np.fft.fftfreq(n))
    for axis_resp in (mag[0, :], mag[:, 0]):
        assert axis_resp[w < 0.6 * wc].min() > 0.8
        assert axis_resp[w > 1.5 * wc].max() < 0.1
        at_wc = axis_resp[np.argmin(np.abs(w - wc))]
        assert 0.3 < at_wc < 0.7  # the transition is centred on ω_c


def test_sinc_against_scipy_loop():
    size, omegas = 13, [math.pi / 5, 1.3, math.pi]
    got = K.circular_sinc_kernels(size, torch.tensor(omegas, dtype=F64)).numpy()
    c = size // 2
    for b, wc in enumerate(omegas):
        ref = np.empty((size, size))
        for i in range(size):
            for j in range(size):
                r = math.hypot(i - c, j - c)
                ref[i, j] = wc**2 / (4 * math.pi) if r == 0 else wc * j1(wc * r) / (2 * math.pi * r)
        # torch's float64 bessel_j1 has ~5e-7 absolute error for arguments in (5, 10).
        np.testing.assert_allclose(got[b], ref / ref.sum(), atol=1e-6)


@pytest.mark.parametrize("family", ["gaussian", "generalized", "plateau", "sinc"])
def test_mask_equals_generate_small_then_pad(family):
    sizes = torch.tensor([7, 11, 15, 21])
    sx, sy, th = torch.tensor([2.5, 1.0, 3.0, 0.7], dtype=F64), torch.tensor([1.0, 2.0, 2.2, 0.7], dtype=F64), torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
    beta, om = torch.tensor([0.6, 1.5, 3.0, 2.0], dtype=F64), torch.tensor([0.7, 1.2, 2.0, 3.0], dtype=F64)

    def make(size, sl):
        if family == "sinc":
            return K.circular_sinc_kernels(size, om[sl])
        return K.gaussian_family_kernels(size, sx[sl], sy[sl], th[sl], beta[sl], family)

    masked = K.mask_to_sizes(make(21, slice(None)), sizes)
    for b, s in enumerate(sizes.tolist()):
        padded = F.pad(make(s, slice(b, b + 1)), [(21 - s) // 2] * 4)[0]
        torch.testing.assert_close(masked[b], padded, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_filter_per_sample_matches_conv2d_loop(dtype):
    torch.manual_seed(0)
    imgs = torch.rand(3, 2, 24, 19, dtype=dtype)
    kers = torch.rand(3, 7, 7, dtype=dtype)  # asymmetric: checks the correlation convention too
    got = filtering.filter_per_sample(imgs, kers)
    for b in range(3):
        x = F.pad(imgs[b : b + 1], [3, 3, 3, 3], mode="reflect")
        ref = F.conv2d(x, kers[b].expand(2, 1, 7, 7), groups=2)  # conv2d is cross-correlation
        torch.testing.assert_close(got[b : b + 1], ref)


@pytest.mark.parametrize("b, h, w, k, bands", [(1, 262, 40, 21, 10), (2, 57, 33, 9, 5),
                                                (5, 64, 64, 21, 2), (1, 20, 30, 21, 1)])
def test_filter_per_sample_in_bands_is_bit_identical(b, h, w, k, bands):
    """On the CPU, few planes are filtered in bands of rows (to fill oneDNN's vector lanes):
    the same sums as kornia's filter2d on the whole images, bit for bit, and as a loop."""
    from kornia.filters import filter2d

    torch.manual_seed(1)
    imgs, kers = torch.rand(b, 3, h, w), torch.rand(b, k, k)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # 32 lanes: the band counts below
    try:
        assert filtering._strips(imgs, k) == bands
        got = filtering.filter_per_sample(imgs, kers)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, filter2d(imgs, kers, border_type="reflect"))
    r = k // 2
    for i in range(b):
        x = F.pad(imgs[i:i + 1], [r] * 4, mode="reflect")
        torch.testing.assert_close(got[i:i + 1], F.conv2d(x, kers[i].expand(3, 1, k, k), groups=3))


def test_sample_blur_kernels_match_numpy_reference():
    k, p = K.sample_blur_kernels(64, gen(3), dtype=F64, **SAMPLE_CFG)
    names = TYPES + ["sinc"]
    assert len(set(p["kernel_type"].tolist())) >= 5
    for b in range(64):
        ref = np_reference_kernel(int(p["kernel_size"][b]), names[p["kernel_type"][b]], *(float(p[n][b]) for n in ("sigma_x", "sigma_y", "theta", "beta", "omega_c")))
        np.testing.assert_allclose(k[b].numpy(), ref, atol=1e-6)


def test_sample_blur_kernels_determinism_and_dtype():
    a, pa = K.sample_blur_kernels(16, gen(7), **SAMPLE_CFG)
    b, pb = K.sample_blur_kernels(16, gen(7), **SAMPLE_CFG)
    c, _ = K.sample_blur_kernels(16, gen(8), **SAMPLE_CFG)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(a, c)
    d, pd = K.sample_blur_kernels(16, gen(7), dtype=F64, **SAMPLE_CFG)  # same draws in float64
    assert torch.equal(pa["kernel_type"], pd["kernel_type"])
    torch.testing.assert_close(d.float(), a, atol=1e-5, rtol=1e-4)


def test_sample_blur_kernels_statistics():
    n = 20000
    _, p = K.sample_blur_kernels(n, gen(11), **SAMPLE_CFG)
    sinc_prob = SAMPLE_CFG["sinc_prob"]
    expected = [(1 - sinc_prob) * q for q in SAMPLE_CFG["kernel_probs"]] + [sinc_prob]
    counts = torch.bincount(p["kernel_type"], minlength=7).numpy() / n
    for got, exp in zip(counts, expected):
        assert abs(got - exp) < 3 * math.sqrt(exp * (1 - exp) / n), (counts, expected)
    size, t = p["kernel_size"], p["kernel_type"]
    assert set(size.unique().tolist()) == set(SAMPLE_CFG["kernel_sizes"])
    gauss = t < 6
    for name in ("sigma_x", "sigma_y"):
        assert (p[name][gauss] >= 0.2).all() and (p[name][gauss] <= 3.0).all()
    iso = (t == 0) | (t == 2) | (t == 4)
    assert torch.equal(p["sigma_x"][iso], p["sigma_y"][iso]) and (p["theta"][iso] == 0).all()
    aniso = (t == 1) | (t == 3) | (t == 5)
    assert p["theta"][aniso].abs().max() <= math.pi and p["theta"][aniso].abs().max() > 3.0
    bg, bp = p["beta"][(t == 2) | (t == 3)], p["beta"][(t == 4) | (t == 5)]
    assert bg.min() >= 0.5 and bg.max() <= 4.0 and abs((bg < 1).double().mean() - 0.5) < 0.05
    assert bp.min() >= 1.0 and bp.max() <= 2.0
    assert (p["beta"][(t == 0) | (t == 1) | (t == 6)] == 0).all()
    om = p["omega_c"]
    assert (om[t != 6] == 0).all() and (p["sigma_x"][t == 6] == 0).all()
    small, big = om[(t == 6) & (size < 13)], om[(t == 6) & (size >= 13)]
    assert small.min() >= math.pi / 3 - 1e-6 and big.min() >= math.pi / 5 - 1e-6 and big.min() < math.pi / 3
    assert om.max() <= math.pi + 1e-6


def test_blur_std_of_iso_gaussian():
    sig = torch.tensor([0.8, 1.5, 2.5], dtype=F64)
    k = K.gaussian_family_kernels(41, sig, sig, torch.zeros(3, dtype=F64))
    np.testing.assert_allclose(K.kernel_std(k).numpy(), sig.numpy(), rtol=2e-4)  # grid sampling, see above
    cfg = dict(SAMPLE_CFG, kernel_types=["iso"], kernel_probs=[1.0], sinc_prob=0.0, sigma_range=(1.0, 1.5), kernel_sizes=[21])
    kk, p = K.sample_blur_kernels(8, gen(2), max_size=41, dtype=F64, **cfg)
    np.testing.assert_allclose(p["blur_std"].numpy(), p["sigma_x"].numpy(), rtol=1e-3)


def test_final_sinc_identity_and_sinc():
    imgs = torch.rand(4, 3, 16, 16)
    k, p = K.sample_sinc_kernels(4, gen(0), kernel_sizes=[7, 21], prob=0.0)
    assert not p["final_sinc"].any() and (p["final_omega_c"] == 0).all()
    assert torch.equal(filtering.filter_per_sample(imgs, k), imgs)
    k, p = K.sample_sinc_kernels(400, gen(0), kernel_sizes=[7, 21], prob=1.0, dtype=F64)
    om = p["final_omega_c"]
    assert p["final_sinc"].all() and om.min() >= math.pi / 3 and om.max() <= math.pi
    assert set(p["final_kernel_size"].unique().tolist()) == {7, 21}
    for b in range(0, 400, 50):
        ref = np_reference_kernel(int(p["final_kernel_size"][b]), "sinc", 0, 0, 0, 0, float(om[b]))
        np.testing.assert_allclose(k[b].numpy(), ref, atol=1e-6)
    _, p = K.sample_sinc_kernels(4000, gen(5), kernel_sizes=[7, 21], prob=0.8)
    assert abs(p["final_sinc"].double().mean() - 0.8) < 3 * math.sqrt(0.8 * 0.2 / 4000)


def test_kernel_types_are_drawn_from_the_given_subset_in_its_order():
    """``kernel_probs[i]`` is the probability of ``kernel_types[i]`` whatever the list's order
    or subset (not of the i-th entry of KERNEL_TYPES); each kernel is its family's formula."""
    cfg = dict(SAMPLE_CFG, kernel_types=["plateau_aniso", "generalized_iso"], kernel_probs=[0.7, 0.3],
               sinc_prob=0.0)
    n = 800
    k, p = K.sample_blur_kernels(n, gen(4), dtype=F64, **cfg)
    t = p["kernel_type"]
    assert set(t.unique().tolist()) == {TYPES.index("plateau_aniso"), TYPES.index("generalized_iso")}
    frac = (t == TYPES.index("plateau_aniso")).double().mean().item()
    assert abs(frac - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n)
    for b in range(0, n, 80):
        ref = np_reference_kernel(int(p["kernel_size"][b]), TYPES[t[b]],
                                  *(float(p[m][b]) for m in ("sigma_x", "sigma_y", "theta", "beta", "omega_c")))
        np.testing.assert_allclose(k[b].numpy(), ref, atol=1e-6)


def test_anisotropic_sigmas_are_drawn_independently():
    """Every anisotropic family (aniso, generalized_aniso, plateau_aniso) draws sigma_y from
    the sigma range independently of sigma_x, with a rotation: its kernel's second moments
    have two distinct principal values (float64 numpy eigenvalues of the kernel's moments)."""
    n = 1200
    cfg = dict(SAMPLE_CFG, kernel_types=["aniso", "generalized_aniso", "plateau_aniso"],
               kernel_probs=[1 / 3, 1 / 3, 1 / 3], sinc_prob=0.0, kernel_sizes=[21])
    k, p = K.sample_blur_kernels(n, gen(6), dtype=F64, **cfg)
    sx, sy, t = p["sigma_x"].numpy(), p["sigma_y"].numpy(), p["kernel_type"].numpy()
    for ktype in ("aniso", "generalized_aniso", "plateau_aniso"):
        sel = t == TYPES.index(ktype)
        assert sel.sum() > n / 4, ktype
        x, y = sx[sel], sy[sel]
        assert abs(np.corrcoef(x, y)[0, 1]) < 4 / math.sqrt(sel.sum()), ktype  # independent
        # U[0.2, 3]: mean 1.6, std 2.8/sqrt(12)
        assert abs(y.mean() - 1.6) < 4 * (2.8 / math.sqrt(12)) / math.sqrt(sel.sum()), ktype
        assert (np.abs(p["theta"].numpy()[sel]) > 0).all()
    # the Gaussian ones: the kernel's own moment matrix is anisotropic where sx, sy differ much
    xx, yy = np_grid(21)
    for b in np.flatnonzero((t == TYPES.index("aniso")) & (np.minimum(sx, sy) > 0.8)
                            & (np.maximum(sx, sy) < 2.5) & (np.abs(sx - sy) > 0.6))[:20]:
        kb = k[b].numpy()
        m = np.array([[(kb * xx * xx).sum(), (kb * xx * yy).sum()],
                      [(kb * xx * yy).sum(), (kb * yy * yy).sum()]])
        ev = np.sort(np.linalg.eigvalsh(m))
        np.testing.assert_allclose(ev, np.sort([sx[b] ** 2, sy[b] ** 2]), rtol=0.02, atol=0.02)


def test_sinc_cutoff_range_switches_at_size_13():
    """BasicSR: a sinc of size < 13 takes ω_c ~ U[π/3, π], from 13 on U[π/5, π] (so a 13-tap
    sinc can be wider): fractions below π/3 against the uniform law's 0 and 1/6."""
    n = 300
    cfg = dict(SAMPLE_CFG, sinc_prob=1.0)
    for size, below in ((11, 0.0), (13, 1 / 6), (15, 1 / 6)):
        _, p = K.sample_blur_kernels(n, gen(size), **dict(cfg, kernel_sizes=[size]))
        om = p["omega_c"].double()
        frac = (om < math.pi / 3).double().mean().item()
        assert abs(frac - below) < 4 * math.sqrt(1 / 6 * 5 / 6 / n) + 1e-9, (size, frac)
        assert om.min() >= math.pi / 5 - 1e-6 and om.max() <= math.pi + 1e-6


@pytest.mark.parametrize("h, w", [(3, 10), (10, 3), (4, 4)])
def test_filter_per_sample_on_images_no_wider_than_the_radius(h, w):
    """A side of at most k // 2 pixels (here 3 or 4 for k = 7 or 9) cannot be reflect-padded:
    such images are padded by replication, as a loop of F.pad(replicate) + conv2d does."""
    torch.manual_seed(2)
    k = 2 * min(h, w) + 1  # min(h, w) == k // 2: the last size that must replicate
    imgs, kers = torch.rand(2, 3, h, w, dtype=F64), torch.rand(2, k, k, dtype=F64)
    got = filtering.filter_per_sample(imgs, kers)
    r = k // 2
    for b in range(2):
        x = F.pad(imgs[b:b + 1], [r] * 4, mode="replicate")
        ref = F.conv2d(x, kers[b].expand(3, 1, k, k), groups=3)
        torch.testing.assert_close(got[b:b + 1], ref, rtol=0, atol=1e-12)
