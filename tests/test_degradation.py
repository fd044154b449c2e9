"""The degradation pipeline and its ops, against independent computations."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from degsr.config import load_config
from degsr.degradation import ops
from degsr.degradation.negatives import online_negatives
from degsr.degradation.pipeline import Degrader
from degsr.degradation.scores import blur_std_lr, degradation_scores, score_bounds

ROOT = Path(__file__).resolve().parents[1]


def preset(name="s3diff", *overrides):
    return load_config([ROOT / f"configs/degradation/{name}.yaml"], list(overrides)).degradation


def photos(n, size, seed=0):
    import skimage.data
    img = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 255.0
    g = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, 512 - size, (n,), generator=g).tolist()
    xs = torch.randint(0, 512 - size, (n,), generator=g).tolist()
    return torch.stack([img[:, y:y + size, x:x + size] for y, x in zip(ys, xs)])


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["s3diff", "realesrgan"])
def test_same_seed_identical_other_seed_different(name):
    d, hr = Degrader(preset(name)), photos(4, 64)
    a, b, c = d(hr, gen(1)), d(hr, gen(1)), d(hr, gen(2))
    assert torch.equal(a["lr"], b["lr"]) and torch.equal(a["scores"], b["scores"])
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert not torch.equal(a["lr"], c["lr"])


@pytest.mark.parametrize("scale", [2, 4])
def test_shapes_range_and_quantisation(scale):
    out = Degrader(preset("realesrgan", f"degradation.scale={scale}"))(photos(6, 64), gen(0))
    assert out["lr"].shape == (6, 3, 64 // scale, 64 // scale)
    assert out["lr_up"].shape == out["hr"].shape == out["gt"].shape == (6, 3, 64, 64)
    lr = out["lr"]
    assert lr.min() >= 0 and lr.max() <= 1
    torch.testing.assert_close(lr * 255, (lr * 255).round(), rtol=0, atol=1e-4)
    assert out["scores"].shape == (6, 2) and ((out["scores"] >= 0) & (out["scores"] <= 1)).all()
    for v in out["params"].values():
        assert v.shape == (6,)


def test_hr_size_must_be_multiple_of_scale():
    from degsr.errors import UserError
    with pytest.raises(UserError, match="multiples of scale 4"):
        Degrader(preset())(torch.rand(1, 3, 30, 32), gen(0))


def test_no_degradation_path_is_clean_bicubic_downsample():
    hr = photos(3, 64)
    out = Degrader(preset("s3diff", "degradation.no_degradation_prob=1"))(hr, gen(0))
    ref = F.interpolate(hr.double(), size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    ref = (ref * 255).round().clamp(0, 255) / 255
    torch.testing.assert_close(out["lr"].double(), ref, rtol=0, atol=1.01 / 255)
    assert out["clean"].all() and (out["scores"] == 0).all()


def test_identity_chain_reproduces_downsample():
    """With blur, noise, sinc and resizes off and JPEG at 100, the LR is the area downsample."""
    off = ["degradation.no_degradation_prob=0", "degradation.final_sinc_prob=0",
           "degradation.final_resize_modes=[area]"]
    for r in ("first", "second"):
        off += [f"degradation.{r}.blur_prob=0", f"degradation.{r}.resize_probs=[0,0,1]",
                f"degradation.{r}.gaussian_noise_prob=1", f"degradation.{r}.noise_sigma=[0,0]",
                f"degradation.{r}.jpeg_quality=[100,100]", f"degradation.{r}.resize_modes=[area]"]
    hr = photos(2, 64)
    out = Degrader(preset("s3diff", *off))(hr, gen(0))
    from kornia.color import rgb_to_ycbcr
    luma = lambda x: rgb_to_ycbcr(x)[:, 0]  # noqa: E731 - JPEG 4:2:0 still subsamples chroma
    err = (luma(out["lr"]) - luma(F.avg_pool2d(hr, 4))).abs()
    assert err.mean() < 1.0 / 255 and err.max() < 4.0 / 255


def test_gaussian_noise_statistics_on_flat_images():
    x = torch.full((2, 3, 256, 256), 0.5)
    sigma = torch.tensor([5.0, 20.0])
    gray = torch.tensor([False, True])
    n = ops.gaussian_noise(gen(0), x, sigma, gray)
    for b in range(2):
        assert abs(n[b].std().item() * 255 - sigma[b].item()) < 0.02 * sigma[b].item()
        assert abs(n[b].mean().item()) < 3 * sigma[b].item() / 255 / math.sqrt(n[b].numel() / 3)
    assert torch.equal(n[1, 0], n[1, 2]) and not torch.equal(n[0, 0], n[0, 2])


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-tables", "torch.poisson"])
@pytest.mark.parametrize("level", [20, 128, 230])
def test_poisson_noise_mean_and_variance(level, accelerator):
    v = level / 255
    x = torch.full((2, 3, 256, 256), v)
    x[:, :, 0, :200] = torch.arange(200) / 255  # > 128 distinct values: the reference's 256 levels
    scale = torch.tensor([1.0, 2.0])
    with ops.accelerator_path(accelerator):  # the sampler accelerators use, taken on the CPU
        n = ops.poisson_noise(gen(0), x, scale, torch.tensor([False, False]))
    for b in range(2):
        s = scale[b].item()
        flat = n[b, :, 1:]
        expected_var = s ** 2 * v / 256  # Var(Poisson(256 v)/256) = v/256, times scale²
        assert abs(flat.var().item() / expected_var - 1) < 0.03
        assert abs(flat.mean().item()) < 4 * math.sqrt(expected_var / flat.numel())


def test_poisson_levels_follow_distinct_value_count():
    from degsr.degradation.ops import poisson_levels

    imgs = torch.zeros(3, 3, 16, 16)
    imgs[0].view(-1)[:200] = torch.arange(200).float()  # 200 distinct -> 256
    imgs[1].view(-1)[:40] = torch.arange(40).float()  # 40 distinct -> 64
    # imgs[2]: one value -> 1
    expected = [2 ** math.ceil(math.log2(len(torch.unique(im)))) for im in imgs]
    assert poisson_levels(imgs).view(-1).tolist() == expected == [256, 64, 1]


def test_usm_sharpen_only_changes_edges_and_keeps_flat():
    flat = torch.full((1, 3, 64, 64), 0.4)
    torch.testing.assert_close(ops.usm_sharpen(flat, 0.5, 10, 51, 8.0), flat)
    edge = torch.zeros(1, 3, 64, 64)
    edge[..., 32:] = 0.8
    sharp = ops.usm_sharpen(edge, 0.5, 10, 51, 8.0)
    assert sharp[0, 0, 10, 33] > 0.8 - 1e-6 and sharp[0, 0, 10, 30] <= 1e-6 + 0  # overshoot on the bright side


def test_usm_sharpen_matches_float64_formula():
    """Real-ESRGAN's USM written out in float64: a 51 x 51 Gaussian of sigma 8 (exp(-d²/2σ²),
    normalised), reflect padding, the 10/255 threshold on |I - B|, the mask blurred the same way;
    tiny images (narrower than 26) are padded by replication instead."""
    from degsr.data.photos import load_photo

    def reference(img):
        d = torch.arange(51, dtype=torch.float64) - 25
        g = torch.exp(-d ** 2 / (2 * 8.0 ** 2))
        kernel = torch.outer(g, g) / g.sum() ** 2
        mode = "reflect" if min(img.shape[-2:]) > 25 else "replicate"

        def blur(t):
            return torch.nn.functional.conv2d(torch.nn.functional.pad(t, [25] * 4, mode=mode),
                                              kernel.expand(3, 1, 51, 51), groups=3)

        residual = img - blur(img)
        soft = blur((residual.abs() * 255 > 10).double())
        return soft * (img + 0.5 * residual).clamp(0, 1) + (1 - soft) * img

    photo = torch.from_numpy(load_photo("chelsea")[:96, :128].copy()).permute(2, 0, 1)[None] / 255.0
    for img in (photo, photo[..., :20, :24]):
        got = ops.usm_sharpen(img.float(), 0.5, 10, 51, 8.0).double()
        ref = reference(img.double())
        assert (got - ref).abs().mean() < 1e-6 and (got - ref).abs().max() < 1e-3
        assert (ref - img).abs().max() > 0.01  # it does sharpen


def _hand_params(**over):
    z = torch.zeros(1)
    p = {"blur1_std": torch.tensor([1.0]), "blur1_omega_c": z, "blur1_applied": torch.tensor([True]),
         "blur2_std": torch.tensor([0.5]), "blur2_omega_c": z, "blur2_applied": torch.tensor([True]),
         "resize1_scale": torch.tensor([0.5]), "resize2_scale": torch.tensor([1.0]),
         "final_sinc": torch.tensor([False]), "final_omega_c": z,
         "noise1_gaussian": torch.tensor([True]), "noise1_sigma": torch.tensor([3.0]),
         "noise1_poisson_scale": z, "noise2_gaussian": torch.tensor([True]),
         "noise2_sigma": torch.tensor([4.0]), "noise2_poisson_scale": z,
         "jpeg1_quality": torch.tensor([90.0]), "jpeg2_quality": torch.tensor([80.0]),
         "clean": torch.tensor([False]), "final_jpeg_first": torch.tensor([False])}
    p.update({k: torch.tensor([v]) for k, v in over.items()})
    return p


def test_blur_std_closed_form():
    # var_HR = 1² + (0.5/0.5)² + box of the coarsest resolution min(0.5, 1/4, 1/4) = 4² / 12
    expected = math.sqrt(1 + 1 + 16 / 12) / 4
    assert blur_std_lr(_hand_params(), 4).item() == pytest.approx(expected, rel=1e-6)


def test_blur_std_closed_form_with_sincs_a_skipped_blur_and_a_coarse_round_2():
    """The other branches of the blur model, written out: a round-1 sinc at ω = π/2 counts as the
    Gaussian whose response halves there, sqrt(2 ln 2)/ω (its std field is not read); a second
    blur that did not run adds nothing (whatever its std); the final sinc (ω = 2π/3) acts on the
    LR, so its std is scale times that in HR pixels; resize 2 to 0.8 of the LR size makes the
    coarsest resolution 0.8/4 = 0.2 of HR (box variance (1/0.2)²/12)."""
    c = math.sqrt(2 * math.log(2))
    p = _hand_params(blur1_omega_c=math.pi / 2, blur1_std=7.0, blur2_applied=False,
                     blur2_std=3.0, resize2_scale=0.8, final_sinc=True,
                     final_omega_c=2 * math.pi / 3)
    var = (c / (math.pi / 2)) ** 2 + (c / (2 * math.pi / 3) * 4) ** 2 + (1 / 0.2) ** 2 / 12
    assert blur_std_lr(p, 4).item() == pytest.approx(math.sqrt(var) / 4, rel=1e-6)
    # and the skipped second blur is the same as a second blur of std 0
    q = _hand_params(blur1_omega_c=math.pi / 2, blur2_std=0.0, resize2_scale=0.8,
                     final_sinc=True, final_omega_c=2 * math.pi / 3)
    assert blur_std_lr(q, 4).item() == pytest.approx(math.sqrt(var) / 4, rel=1e-6)

def test_scores_are_monotone_and_clean_is_zero():
    cfg = preset()
    base = degradation_scores(_hand_params(), cfg)[0]
    assert degradation_scores(_hand_params(blur1_std=1.4), cfg)[0, 0] > base[0]
    assert degradation_scores(_hand_params(noise2_sigma=9.0), cfg)[0, 1] > base[1]
    assert degradation_scores(_hand_params(jpeg2_quality=65.0), cfg)[0, 1] > base[1]
    assert degradation_scores(_hand_params(noise2_sigma=9.0), cfg)[0, 0] == base[0]
    assert (degradation_scores(_hand_params(clean=True), cfg) == 0).all()
    b = score_bounds(cfg)
    assert b["blur_clean"] == pytest.approx(math.sqrt(1 / 12))


def test_scores_spread_over_many_draws():
    out = Degrader(preset())(photos(32, 64), gen(3))
    s = out["scores"][~out["clean"]]
    assert s[:, 0].std() > 0.05 and s[:, 1].std() > 0.05


def test_negatives_fraction_and_targets():
    d = Degrader(preset())(photos(4, 32), gen(0))
    g = gen(5)
    counts = 0
    trials = 2000
    for _ in range(trials // 4):
        counts += int(online_negatives(d, g, 0.05)["negative"].sum())
    p = counts / trials
    assert abs(p - 0.05) < 3 * math.sqrt(0.05 * 0.95 / trials)
    out = online_negatives(d, gen(1), 1.0)
    assert torch.equal(out["target"], d["lr_up"]) and out["negative"].all()
    out = online_negatives(d, gen(1), 0.0)
    assert torch.equal(out["target"], d["gt"]) and not out["negative"].any()


def test_negatives_target_the_lr_up_and_the_others_the_sharpened_gt():
    """Per sample: a negative's target is its own lr_up, every other sample's is ``gt`` -- the
    training target, which under the realesrgan preset is the USM-sharpened HR, not ``hr``."""
    d = Degrader(preset("realesrgan"))(photos(8, 32), gen(0))
    assert not torch.equal(d["gt"], d["hr"])
    out = online_negatives(d, gen(2), 0.5)
    neg = out["negative"]
    assert neg.any() and not neg.all()
    for i in range(8):
        want = d["lr_up"][i] if neg[i] else d["gt"][i]
        assert torch.equal(out["target"][i], want), i

def test_realesrgan_target_is_sharpened():
    hr = photos(2, 64)
    out = Degrader(preset("realesrgan"))(hr, gen(0))
    assert torch.equal(out["hr"], hr) and not torch.equal(out["gt"], hr)
    torch.testing.assert_close(out["gt"], ops.usm_sharpen(hr, 0.5, 10, 51, 8.0))


def test_uint8_input_equals_float_input():
    hr = (photos(2, 64) * 255).round().to(torch.uint8)
    a = Degrader(preset())(hr, gen(0))
    b = Degrader(preset())(hr.float() / 255, gen(0))
    assert torch.equal(a["lr"], b["lr"])


def test_modelled_scores_without_jpeg_or_noise_are_zero_not_nan():
    """Quality ranges of [100, 100] and zero noise ranges made the modelled noise score 0/0."""
    keys = ["degradation.noise_label=params", "degradation.blur_label=params"]
    for r in ("first", "second"):
        keys += [f"degradation.{r}.jpeg_quality=[100,100]", f"degradation.{r}.noise_sigma=[0,0]",
                 f"degradation.{r}.poisson_scale=[0,0]"]
    out = Degrader(preset("s3diff", *keys))(photos(4, 64), gen(3))
    assert torch.equal(out["scores"][:, 1], torch.zeros(4))


def test_every_key_tuple_has_its_own_seed():
    """Trailing zero keys used to be dropped ((s, 0) drew the stream of (s,)); all 1 + 4 + 16 +
    64 key tuples of length <= 3 over {0, 1, 2, 7} now give distinct seeds."""
    import itertools

    from degsr.seeding import derive_seed

    tuples = [t for n in range(4) for t in itertools.product([0, 1, 2, 7], repeat=n)]
    assert len({derive_seed(5, *t) for t in tuples}) == len(tuples) == 85


def test_rank_and_worker_streams_differ_and_repeat():
    from degsr.seeding import make_generator

    draw = lambda *k: torch.rand(8, generator=make_generator(7, *k))  # noqa: E731
    assert torch.equal(draw(0, 1), draw(0, 1))
    streams = [draw(r, w) for r in range(2) for w in range(2)]
    assert all(not torch.equal(a, b) for i, a in enumerate(streams) for b in streams[i + 1:])


def test_sample_then_apply_equals_call_and_allows_controlled_changes():
    from degsr.degradation.kernels import gaussian_family_kernels, kernel_std

    # the modelled noise label: its noise score reads no blur parameter (asserted at the end)
    d, hr = Degrader(preset("s3diff", "degradation.noise_label=params")), photos(4, 64)
    draw = d.sample(4, gen(9))
    g = gen(9)
    d.sample(4, g)  # advance to where apply draws its noise
    state = g.get_state()
    torch.testing.assert_close(d.apply(hr, draw, g)["lr"], d(hr, gen(9))["lr"], rtol=0, atol=0)
    # a ranking pair: the same draw and noise, only the first blur made stronger
    sigma = torch.full((4,), 3.0)
    strong = {"params": {**draw["params"], "blur1_applied": torch.ones(4, dtype=torch.bool),
                         "blur1_std": kernel_std(gaussian_family_kernels(21, sigma, sigma, 0 * sigma)),
                         "blur1_omega_c": torch.zeros(4)},
              "kernels": {**draw["kernels"],
                          "blur1": gaussian_family_kernels(21, sigma, sigma, 0 * sigma)}}
    weak = {"params": {**draw["params"], "blur1_applied": torch.zeros(4, dtype=torch.bool)},
            "kernels": draw["kernels"]}
    g_weak, g_strong = torch.Generator(), torch.Generator()
    g_weak.set_state(state)
    g_strong.set_state(state)
    a, b = d.apply(hr, weak, g_weak), d.apply(hr, strong, g_strong)
    keep = ~draw["params"]["clean"]
    assert (b["scores"][keep, 0] > a["scores"][keep, 0]).all()
    assert torch.equal(a["scores"][:, 1], b["scores"][:, 1])


# ------------------------------------------------------------------- measured noise label
def _only_round2_gaussian(draw: dict, sigma: float, n: int) -> dict:
    """The draw edited so that the LR carries exactly one artefact: round-2 Gaussian noise of
    ``sigma``/255 at LR size, gray (JPEG subsamples chroma), left as it is by everything after it
    (no resize, no sinc, JPEG at quality 100), on top of whatever blur/resize came before."""
    p = draw["params"]
    p.update(noise1_gaussian=torch.ones(n, dtype=torch.bool), noise1_sigma=torch.zeros(n),
             noise2_gaussian=torch.ones(n, dtype=torch.bool), noise2_gray=torch.ones(n, dtype=torch.bool),
             noise2_sigma=torch.full((n,), sigma), resize2_scale=torch.ones(n),
             jpeg1_quality=torch.full((n,), 100.0), jpeg2_quality=torch.full((n,), 100.0),
             final_sinc=torch.zeros(n, dtype=torch.bool), clean=torch.zeros(n, dtype=torch.bool))
    return _no_final_filter(draw)


def _no_final_filter(draw: dict) -> dict:
    """The draw with a centred delta as its final kernel: no final filter."""
    k = torch.zeros_like(draw["kernels"]["final"])
    k[:, k.shape[1] // 2, k.shape[2] // 2] = 1.0
    draw["kernels"]["final"] = k
    return draw


def test_measured_noise_label_is_the_visible_noise_std():
    """Gray HR, one known artefact: the measured label is sigma / noise_label_ref (closed form:
    the std of N(0, sigma) noise, plus the 8-bit rounding and q-100 JPEG, ~0.3/255)."""
    cfg = preset("s3diff", "degradation.noise_label=measured", "degradation.noise_label_ref=16")
    deg = Degrader(cfg)
    n, hr = 6, torch.full((6, 3, 128, 128), 0.5)
    for sigma in (4.0, 8.0):
        draw = _only_round2_gaussian(deg.sample(n, torch.Generator().manual_seed(3)), sigma, n)
        out = deg.apply(hr, draw, torch.Generator().manual_seed(4))
        measured = out["scores"][:, 1] * 16
        assert torch.all((measured - sigma).abs() < 0.35), (sigma, measured)
        # the LR itself: std of a flat image plus that noise, computed from the pixels
        pixel_std = out["lr"].flatten(1).std(1) * 255
        assert torch.allclose(measured, pixel_std, atol=0.3)


def test_measured_noise_label_orders_and_zeroes():
    cfg = preset("s3diff", "degradation.noise_label=measured")
    deg = Degrader(cfg)
    hr = photos(4, 64)
    weak = _only_round2_gaussian(deg.sample(4, torch.Generator().manual_seed(5)), 3.0, 4)
    strong = _only_round2_gaussian(deg.sample(4, torch.Generator().manual_seed(5)), 12.0, 4)
    a = deg.apply(hr, weak, torch.Generator().manual_seed(6))["scores"][:, 1]
    b = deg.apply(hr, strong, torch.Generator().manual_seed(6))["scores"][:, 1]
    assert torch.all(b > a)
    clean = deg.sample(4, torch.Generator().manual_seed(5))
    clean["params"]["clean"] = torch.ones(4, dtype=torch.bool)
    assert torch.all(deg.apply(hr, clean, torch.Generator().manual_seed(6))["scores"] == 0)
    # the LR does not depend on the label mode (same draws, same generator)
    params_mode = Degrader(preset("s3diff"))(hr, torch.Generator().manual_seed(9))
    measured_mode = deg(hr, torch.Generator().manual_seed(9))
    assert torch.equal(params_mode["lr"], measured_mode["lr"])


def test_same_device_takes_indexless_cuda_as_the_current_one():
    from degsr.degradation.pipeline import same_device
    dev = torch.device
    assert same_device(dev("cuda"), dev("cuda", 0)) and same_device(dev("cuda", 1), dev("cuda"))
    assert not same_device(dev("cuda", 0), dev("cuda", 1))
    assert not same_device(dev("cpu"), dev("cuda")) and same_device(dev("cpu"), dev("cpu"))


# ------------------------------------------------------------------- measured blur label
def _gaussian_then_resize(draw: dict, sigmas: list[float], mode: str) -> dict:
    """The draw edited to one linear chain per sample: a Gaussian blur of ``sigma`` HR pixels
    (none for 0), then a single resize to the LR size with ``mode`` (no second blur, no final
    sinc; resize 2 at factor 1, so the final resize keeps the size)."""
    from degsr.degradation.kernels import gaussian_family_kernels
    from degsr.degradation.resize import RESIZE_MODES

    n = len(sigmas)
    s = torch.tensor(sigmas, dtype=torch.float32)
    p, k = draw["params"], draw["kernels"]
    p.update(blur1_applied=s > 0, blur2_applied=torch.zeros(n, dtype=torch.bool),
             resize1_scale=torch.ones(n), resize2_scale=torch.ones(n),
             resize2_mode=torch.full((n,), RESIZE_MODES.index(mode)),
             final_sinc=torch.zeros(n, dtype=torch.bool), clean=torch.zeros(n, dtype=torch.bool))
    k["blur1"] = gaussian_family_kernels(21, s.clamp(min=0.1), s.clamp(min=0.1), 0 * s)
    return _no_final_filter(draw)


def _expected_blur_label(sigma: float, mode: str, n_hr: int, scale: int) -> float:
    """1 - E[gain] for white noise, in float64 from PyTorch's own interpolation (not degsr's
    resize matrices) and a Gaussian convolution matrix with reflect borders: the chain and the
    clean downsample are separable, ``C = (M G) ⊗ (M G)`` and ``R = A ⊗ A``, so
    ``E[<Cx, Rx>] / E[<Rx, Rx>] = (<A, M G> / <A, A>)²`` (Frobenius products)."""
    import numpy as np

    eye = torch.eye(n_hr, dtype=torch.float64).view(n_hr, 1, 1, n_hr)
    size = (1, n_hr // scale)
    extra = {} if mode == "area" else {"align_corners": False}
    m = F.interpolate(eye, size=size, mode=mode, **extra)[:, 0, 0].T.numpy()
    a = F.interpolate(eye, size=size, mode="bicubic", align_corners=False,
                      antialias=True)[:, 0, 0].T.numpy()
    g = np.eye(n_hr)
    if sigma > 0:
        x = np.arange(-10, 11)
        taps = np.exp(-x ** 2 / (2 * sigma ** 2))
        taps /= taps.sum()
        padded = np.pad(np.eye(n_hr), ((10, 10), (0, 0)), mode="reflect")
        g = np.stack([padded[i:i + 21].T @ taps for i in range(n_hr)])
    return 1 - (np.sum(a * (m @ g)) / np.sum(a * a)) ** 2


@pytest.mark.parametrize("mode", ["bicubic", "area"])
def test_measured_blur_label_is_the_chain_gain_on_white_noise(mode):
    """Gaussian blur then one resize: the probe's label against the expectation computed from
    the operators (a different route: PyTorch's interpolation, a float64 convolution matrix).
    The probe is one draw of white noise, so the two agree to its sampling error."""
    probe = 64
    cfg = preset("s3diff", f"degradation.blur_label_probe={probe}")
    deg = Degrader(cfg)
    sigmas = [0.0, 1.5, 2.0, 3.0, 4.5]  # unblurred reads sharper than a clean LR: clipped to 0
    draw = _gaussian_then_resize(deg.sample(len(sigmas), gen(3)), sigmas, mode)
    out = deg.apply(photos(len(sigmas), 64), draw, gen(4))
    label = out["scores"][:, 0]
    expected = torch.tensor([max(0.0, _expected_blur_label(s, mode, probe * 4, 4)) for s in sigmas])
    torch.testing.assert_close(label, expected.float(), rtol=0, atol=0.02)
    assert torch.all(label[1:] > label[:-1] + 0.05)  # well apart: each sigma reads differently


def test_blur_label_probe_too_small_is_a_config_error():
    from degsr.errors import ConfigError
    with pytest.raises(ConfigError, match="degradation.blur_label_probe"):
        preset("s3diff", "degradation.blur_label_probe=2")


def test_measured_blur_label_reads_the_draw_not_the_crop():
    cfg = preset("s3diff")
    deg = Degrader(cfg)
    draw = deg.sample(6, gen(5))
    a = deg.apply(photos(6, 64, seed=1), draw, gen(6))["scores"][:, 0]
    b = deg.apply(photos(6, 128, seed=2), draw, gen(6))["scores"][:, 0]
    assert torch.equal(a, b) and ((a >= 0) & (a <= 1)).all()
    draw["params"]["clean"] = torch.ones(6, dtype=torch.bool)
    assert torch.all(deg.apply(photos(6, 64), draw, gen(6))["scores"][:, 0] == 0)
    # the label mode changes neither the LR nor the noise label (no draw from the generator)
    hr = photos(4, 64)
    modelled = Degrader(preset("s3diff", "degradation.blur_label=params"))(hr, gen(9))
    measured = deg(hr, gen(9))
    assert torch.equal(modelled["lr"], measured["lr"])
    assert torch.equal(modelled["scores"][:, 1], measured["scores"][:, 1])


def test_resize_factors_follow_the_up_down_keep_rule():
    """Real-ESRGAN's resize: with resize_probs (up, down, keep) a factor from U[1, hi], U[lo, 1]
    or exactly 1, per sample: fractions within binomial bounds of the probabilities, and each
    kind's factors spread uniformly over its own interval (mean and range)."""
    n, probs, span = 6000, [0.2, 0.7, 0.1], (0.3, 1.5)
    scale, kind = ops.scale_factors(gen(4), n, probs, span)
    scale = scale.double()
    for k, (p, lo, hi) in enumerate(zip(probs, (1.0, span[0], 1.0), (span[1], 1.0, 1.0))):
        sel = scale[kind == k]
        assert abs(len(sel) / n - p) < 5 * math.sqrt(p * (1 - p) / n), (k, len(sel) / n)
        assert sel.min() >= lo and sel.max() <= hi
        if hi > lo:  # U[lo, hi]: mean (lo + hi) / 2, std (hi - lo) / sqrt(12)
            assert abs(sel.mean() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * len(sel))
            assert sel.min() < lo + 0.02 * (hi - lo) and sel.max() > hi - 0.02 * (hi - lo)
    assert abs((scale > 1).double().mean() - probs[0]) < 5 * math.sqrt(0.16 / n)
    assert abs((scale < 1).double().mean() - probs[1]) < 5 * math.sqrt(0.21 / n)


def test_sinc_counts_as_the_gaussian_halving_at_its_cutoff():
    """A sinc of cut-off ω counts as the Gaussian whose frequency response exp(-σ²ω²/2) is 1/2
    at ω (σ found by bisection here, no closed form), in blur_std_lr for a first-round sinc
    and for the final sinc (which acts on the LR: σ x scale in HR pixels)."""
    from scipy.optimize import brentq

    def halving_sigma(w):
        return brentq(lambda s: math.exp(-(s * w) ** 2 / 2) - 0.5, 1e-6, 100.0, xtol=1e-14)

    w1, wf = 1.2, 2.0
    p = _hand_params(blur1_omega_c=w1, final_sinc=True, final_omega_c=wf)
    # var_HR = σ1² + (0.5/0.5)² + (σf·4)² + the box of resolution 1/4
    expected = math.sqrt(halving_sigma(w1) ** 2 + 1 + (halving_sigma(wf) * 4) ** 2 + 16 / 12) / 4
    assert blur_std_lr(p, 4).item() == pytest.approx(expected, rel=1e-6)


ROUND_CFGS = {
    "first": dict(blur_prob=0.9, gaussian_noise_prob=0.3, gray_noise_prob=0.2, noise_sigma=[1, 5],
                  poisson_scale=[0.1, 0.5], jpeg_quality=[30, 50], resize_range=[0.3, 1.5],
                  resize_probs=[0.2, 0.7, 0.1], blur_sigma=[0.2, 1.0], sinc_prob=0.0,
                  resize_modes=["area", "bilinear", "bicubic"]),
    "second": dict(blur_prob=0.4, gaussian_noise_prob=0.7, gray_noise_prob=0.6, noise_sigma=[10, 20],
                   poisson_scale=[1, 3], jpeg_quality=[70, 95], resize_range=[0.6, 1.2],
                   resize_probs=[0.5, 0.2, 0.3], blur_sigma=[2.0, 3.0], sinc_prob=0.0,
                   resize_modes=["area", "bicubic"]),
}


def test_every_parameter_is_drawn_per_sample_from_its_own_round():
    """One call of ``sample``: each round's flags have their own round's probabilities and its
    continuous parameters fill their own round's ranges uniformly (two rounds with disjoint
    ranges), sample by sample: binomial bounds on the fractions, mean and std of U[lo, hi]."""
    from degsr.degradation.resize import RESIZE_MODES

    def fmt(v):
        return "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else str(v)

    keys = [f"degradation.{r}.{k}={fmt(v)}" for r, c in ROUND_CFGS.items() for k, v in c.items()]
    keys += ["degradation.final_sinc_prob=0.3", "degradation.no_degradation_prob=0.2",
             "degradation.final_resize_modes=[bilinear,bicubic]"]
    n = 600
    p = Degrader(preset("s3diff", *keys)).sample(n, gen(12))["params"]

    def fraction(name, prob):
        got = p[name].double().mean().item()
        assert abs(got - prob) < 5 * math.sqrt(prob * (1 - prob) / n), (name, got, prob)

    def uniform(values, lo, hi, name):
        v = values.double()
        assert v.min() >= lo - 1e-4 and v.max() <= hi + 1e-4, name
        sd = (hi - lo) / math.sqrt(12)
        assert abs(v.mean().item() - (lo + hi) / 2) < 5 * sd / math.sqrt(len(v)), name
        assert abs(v.std().item() / sd - 1) < 0.1, name

    for i, (r, c) in enumerate(ROUND_CFGS.items(), start=1):
        fraction(f"blur{i}_applied", c["blur_prob"])
        fraction(f"noise{i}_gaussian", c["gaussian_noise_prob"])
        fraction(f"noise{i}_gray", c["gray_noise_prob"])
        uniform(p[f"noise{i}_sigma"], *c["noise_sigma"], f"noise{i}_sigma")
        uniform(p[f"noise{i}_poisson_scale"], *c["poisson_scale"], f"noise{i}_poisson_scale")
        uniform(p[f"jpeg{i}_quality"], *c["jpeg_quality"], f"jpeg{i}_quality")
        uniform(p[f"blur{i}_sigma_x"], *c["blur_sigma"], f"blur{i}_sigma_x")
        s = p[f"resize{i}_scale"].double()
        assert s.min() >= c["resize_range"][0] - 1e-6 and s.max() <= c["resize_range"][1] + 1e-6
        up, down, keep = c["resize_probs"]
        for mask, prob in ((s > 1, up), (s < 1, down), (s == 1, keep)):
            got = mask.double().mean().item()
            assert abs(got - prob) < 5 * math.sqrt(prob * (1 - prob) / n), (r, got, prob)
        modes = [RESIZE_MODES.index(m) for m in c["resize_modes"]]
        for m in range(len(RESIZE_MODES)):
            want = 1 / len(modes) if m in modes else 0.0
            got = (p[f"resize{i}_mode"] == m).double().mean().item()
            assert abs(got - want) < 5 * math.sqrt(want * (1 - want) / n) + 1e-12, (r, m, got)
    fraction("final_jpeg_first", 0.5)
    fraction("final_sinc", 0.3)
    fraction("clean", 0.2)
    assert set(p["final_mode"].tolist()) == {RESIZE_MODES.index("bilinear"), RESIZE_MODES.index("bicubic")}
    bicubic = (p["final_mode"] == RESIZE_MODES.index("bicubic")).double().mean().item()
    assert abs(bicubic - 0.5) < 5 * math.sqrt(0.25 / n)


def _resizes_and_jpegs_only(n: int, s2: float, q1: float, q2: float, jpeg_first) -> tuple:
    """(degrader, draw) reduced to resizes and JPEGs: no blur, Gaussian noise of 0, no sinc,
    resize 1 at factor 1, resize 2 to ``s2`` x the LR size and the final one to the LR size,
    all by area; JPEG qualities ``q1``, ``q2``, ``final_jpeg_first`` as given."""
    from degsr.degradation.resize import RESIZE_MODES

    deg = Degrader(preset("s3diff", "degradation.blur_label=params", "degradation.noise_label=params"))
    draw = deg.sample(n, gen(8))
    p, on, off = draw["params"], torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    area = torch.full((n,), RESIZE_MODES.index("area"))
    p.update(blur1_applied=off, blur2_applied=off, resize1_scale=torch.ones(n), resize1_mode=area,
             resize2_scale=torch.full((n,), s2), resize2_mode=area, final_mode=area,
             noise1_gaussian=on, noise2_gaussian=on, noise1_sigma=torch.zeros(n),
             noise2_sigma=torch.zeros(n), jpeg1_quality=torch.full((n,), q1),
             jpeg2_quality=torch.full((n,), q2), final_sinc=off, clean=off,
             final_jpeg_first=torch.as_tensor(jpeg_first))
    return deg, _no_final_filter(draw)


def _closer_to_own(lr, own, other):
    """Each LR is its own reference up to one quantisation step (a q100 JPEG is ~lossless) and
    much further from the other."""
    for b in range(lr.shape[0]):
        err = (lr[b] - own[b]).abs()
        assert err.max() <= 1.01 / 255 and err.mean() < 0.1 / 255, b
        assert (lr[b] - other[b]).abs().mean() > 1 / 255, b


def test_final_jpeg_order_is_per_sample():
    """Resize 2 to twice the LR size, final JPEG at 20: a sample with final_jpeg_first is coded
    at 2x the LR size and then averaged 2 x 2, the others averaged and then coded (references:
    F.avg_pool2d and the codec, composed in each order)."""
    from degsr.degradation.jpeg import jpeg

    order = [True, False, True, False]
    deg, draw = _resizes_and_jpegs_only(4, 2.0, 100.0, 20.0, order)
    hr = photos(4, 64, seed=3)
    lr = deg.apply(hr, draw, gen(9))["lr"]
    q20, mid = torch.full((4,), 20.0), F.avg_pool2d(hr, 2)  # resize 2: 64 -> 32
    first = (F.avg_pool2d(jpeg(mid, q20), 2) * 255).round() / 255
    last = (jpeg(F.avg_pool2d(mid, 2), q20) * 255).round() / 255
    pick = torch.tensor(order).view(-1, 1, 1, 1)
    _closer_to_own(lr, torch.where(pick, first, last), torch.where(pick, last, first))


def test_first_round_jpeg_codes_at_the_resized_size():
    """Round 1 codes its JPEG after resize 1 (here at HR size): at quality 20 and with the rest
    nearly lossless: resize 2 back to HR size, JPEG 2 at 100 there), the LR is the 4 x 4
    average of the twice coded HR, far from that of the HR coded at 100 only."""
    from degsr.degradation.jpeg import jpeg

    deg, draw = _resizes_and_jpegs_only(3, 4.0, 20.0, 100.0, [True, True, True])
    hr = photos(3, 64, seed=4)
    lr = deg.apply(hr, draw, gen(9))["lr"]
    q20, q100 = torch.full((3,), 20.0), torch.full((3,), 100.0)
    coded = (F.avg_pool2d(jpeg(jpeg(hr, q20), q100), 4) * 255).round() / 255
    _closer_to_own(lr, coded, (F.avg_pool2d(jpeg(hr, q100), 4) * 255).round() / 255)


def test_no_degradation_lr_is_taken_from_hr_not_the_sharpened_target():
    """With USM on (realesrgan), a clean sample's LR is the clean downsample of the HR crop as
    given, not of the sharpened training target."""
    hr = photos(3, 64)
    out = Degrader(preset("realesrgan", "degradation.no_degradation_prob=1"))(hr, gen(0))
    assert not torch.equal(out["gt"], hr)
    ref = F.interpolate(hr.double(), size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    ref = (ref * 255).round().clamp(0, 255) / 255
    torch.testing.assert_close(out["lr"].double(), ref, rtol=0, atol=1.01 / 255)
    assert (out["lr"].double() - ref).abs().mean() < 0.05 / 255


def test_batch_generator_is_distinct_per_rank_and_batch():
    """batch_generator(module, purpose) seeds from (seed, purpose + rank, batch index): every
    rank draws its own stream at a batch, each batch its own, and the same (rank, batch) again
    the same stream (compared with numbers drawn from generators seeded by derive_seed)."""
    from types import SimpleNamespace

    from degsr.seeding import batch_generator, derive_seed

    def module(rank, index):
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(total_batch_idx=index))
        return SimpleNamespace(seed=5, global_rank=rank, _trainer=SimpleNamespace(fit_loop=loop))

    draws = {}
    for rank in (0, 1, 2):
        for index in (0, 1, 7):
            got = torch.rand(16, generator=batch_generator(module(rank, index), 3000))
            want = torch.rand(16, generator=torch.Generator().manual_seed(derive_seed(5, 3000 + rank, index)))
            assert torch.equal(got, want), (rank, index)
            draws[rank, index] = got
    keys = list(draws)
    assert all(not torch.equal(draws[a], draws[b]) for i, a in enumerate(keys) for b in keys[i + 1:])
    # outside fit (no trainer): batch index 0
    outside = SimpleNamespace(seed=5, global_rank=1, _trainer=None)
    assert torch.equal(torch.rand(16, generator=batch_generator(outside, 3000)), draws[1, 0])


def test_blur_box_term_never_below_the_final_downsample():
    """The box blur of the coarsest resolution is at least that of the final 1/scale: an image
    resized up in round 2 (s1 = 1, s2 = 2: coarsest 1/2) still counts the box of 1/4."""
    p = _hand_params(resize1_scale=1.0, resize2_scale=2.0)
    # var_HR = 1² + (0.5/1)² + box(1/4) = 1 + 0.25 + 16/12
    assert blur_std_lr(p, 4).item() == pytest.approx(math.sqrt(1 + 0.25 + 16 / 12) / 4, rel=1e-6)


# the s3diff preset's bounds, by hand (scores module docstring): a Poisson draw counts as its
# std at mid-grey, scale·sqrt(0.5/256)·255 in 1/255 units
POISSON_AT_1 = math.sqrt(0.5 / 256) * 255
S3DIFF_NOISE_WORST = math.hypot(max(15.0, 2.0 * POISSON_AT_1) / max(1.0, 0.3 * 4),
                                max(12.0, 1.0 * POISSON_AT_1))
S3DIFF_JPEG_SPAN = 100.0 - min(60.0, 60.0)


def test_noise_score_closed_form():
    """The modelled noise score of hand-made draws against the docstring's model written out:
    round 1 averaged down by max(1, s1·scale), round 2 by max(1, s2), noise stds in quadrature
    over the preset's worst; the stronger JPEG, the final one attenuated only when coded before
    the final resize; noise = (a + b) / 2."""
    cfg = preset("s3diff")
    # A: Poisson 1.0 in round 1 at s1 = 0.2 (k1 = max(1, 0.8) = 1), Gaussian 6 in round 2 at
    # s2 = 2 (k2 = 2); JPEG 95 then 60 coded before the final resize (attenuated by k2 = 2)
    a = _hand_params(noise1_gaussian=False, noise1_poisson_scale=1.0, resize1_scale=0.2,
                     noise2_sigma=6.0, resize2_scale=2.0, jpeg1_quality=95.0, jpeg2_quality=60.0,
                     final_jpeg_first=True)
    noise = math.sqrt(POISSON_AT_1 ** 2 + (6.0 / 2) ** 2) / S3DIFF_NOISE_WORST
    jpeg = max(5 / S3DIFF_JPEG_SPAN, 40 / S3DIFF_JPEG_SPAN / 2)
    assert degradation_scores(a, cfg)[0, 1].item() == pytest.approx((noise + jpeg) / 2, rel=1e-5)
    # B: s1 = 0.75 (k1 = 3): Gaussian 9 and JPEG 60 of round 1 a third as visible; JPEG 2 at
    # 100 (none), after the final resize (never attenuated), s2 = 1
    b = _hand_params(noise1_sigma=9.0, resize1_scale=0.75, noise2_sigma=1.5, jpeg1_quality=60.0,
                     jpeg2_quality=100.0, final_jpeg_first=False)
    noise = math.sqrt((9.0 / 3) ** 2 + 1.5 ** 2) / S3DIFF_NOISE_WORST
    jpeg = 40 / S3DIFF_JPEG_SPAN / 3
    assert degradation_scores(b, cfg)[0, 1].item() == pytest.approx((noise + jpeg) / 2, rel=1e-5)
    # C: the final JPEG after the final resize counts in full even when round 2 went up
    c = _hand_params(resize2_scale=2.0, jpeg1_quality=95.0, jpeg2_quality=70.0, final_jpeg_first=False)
    noise = math.sqrt((3.0 / 2) ** 2 + (4.0 / 2) ** 2) / S3DIFF_NOISE_WORST
    assert degradation_scores(c, cfg)[0, 1].item() == pytest.approx((noise + 30 / 40) / 2, rel=1e-5)


def test_blur_score_closed_form():
    """The modelled blur score against the docstring written out for the s3diff preset: the
    worst case takes each round's widest kernel (a π/5 sinc: sqrt(2 ln 2)/(π/5) > 1.5), the
    second one over the smallest resize 1 (0.3), the widest final sinc (π/3) and the box of
    the coarsest resolution min(0.3, 0.6/4, 1/4); clean is the box of 1/4 alone."""
    cfg = preset("s3diff")
    sinc5, sinc3 = math.sqrt(2 * math.log(2)) / (math.pi / 5), math.sqrt(2 * math.log(2)) / (math.pi / 3)
    worst = math.sqrt(sinc5 ** 2 + (sinc5 / 0.3) ** 2 + (sinc3 * 4) ** 2 + (1 / 0.15) ** 2 / 12) / 4
    clean = math.sqrt(16 / 12) / 4
    sigma = math.sqrt(1 + 1 + 16 / 12) / 4  # _hand_params: see test_blur_std_closed_form
    got = degradation_scores(_hand_params(), cfg)[0, 0].item()
    assert got == pytest.approx((sigma - clean) / (worst - clean), rel=1e-5)



def test_noise_score_saturates_for_edited_draws_beyond_the_preset():
    """A draw edited past the preset's ranges (stage-1 pairs edit draws) scores at most 1: the
    visible-noise term saturates at 1, the score is (1 + JPEG term) / 2."""
    cfg = preset("s3diff")
    p = _hand_params(noise2_sigma=1000.0, jpeg1_quality=95.0, jpeg2_quality=80.0)
    got = degradation_scores(p, cfg)[0, 1].item()
    assert got == pytest.approx((1 + 20 / S3DIFF_JPEG_SPAN) / 2, rel=1e-6) and got <= 1


def test_load_photo_takes_the_left_view_and_greys_to_three_equal_channels():
    """The offline photos as skimage ships them: a stereo pair's left view; a gray picture
    repeated over R, G and B; RGB unchanged (uint8, contiguous)."""
    import numpy as np
    import skimage.data

    from degsr.data.photos import load_photo

    left = load_photo("stereo_motorcycle")
    assert np.array_equal(left, skimage.data.stereo_motorcycle()[0])
    gray = load_photo("camera")
    assert gray.shape == (512, 512, 3) and gray.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(gray[..., c], skimage.data.camera())
    assert np.array_equal(load_photo("astronaut"), skimage.data.astronaut())


def test_final_filter_acts_on_the_lr_after_the_final_resize():
    """Real-ESRGAN's final step is [resize to the LR size, then the sinc]: with a gray HR (JPEG
    at 100 then ~lossless: no chroma), resize 2 to twice the LR size and a known final kernel
    (a Gaussian of sigma 1.5 written out here), the LR is the kernel applied to the 2 x 2 average
    at LR size (F.avg_pool2d, reflect-padded F.conv2d), far from the kernel applied before it."""
    n = 3
    deg, draw = _resizes_and_jpegs_only(n, 2.0, 100.0, 100.0, [True, False, True])
    r = torch.arange(21, dtype=torch.float32) - 10
    g1 = torch.exp(-r ** 2 / (2 * 1.5 ** 2))
    kernel = torch.outer(g1, g1) / g1.sum() ** 2
    draw["kernels"]["final"] = kernel.expand(n, 21, 21).clone()
    draw["params"]["final_sinc"] = torch.ones(n, dtype=torch.bool)
    hr = photos(n, 64, seed=6).mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()
    lr = deg.apply(hr, draw, gen(9))["lr"]

    def blur(x):
        return F.conv2d(F.pad(x, [10] * 4, mode="reflect"), kernel.expand(3, 1, 21, 21), groups=3)

    mid = F.avg_pool2d(hr, 2)  # resize 1 keeps 64, resize 2 to 2 x 16
    after = (blur(F.avg_pool2d(mid, 2)) * 255).round() / 255
    before = (F.avg_pool2d(blur(mid), 2) * 255).round() / 255
    _closer_to_own(lr, after, before)


def test_first_round_noise_is_added_before_its_jpeg():
    """Each round adds its noise and then codes its JPEG: gray Gaussian noise of 8/255 on a flat
    0.5 image, coded at quality 10 (quantisation steps >= 50, six times the noise's DCT std:
    the codec wipes it out), leaves a nearly flat LR; noise added after the codec would stay
    at its full std of 8/255. Everything else is the identity (resize 1 straight to the LR
    size by area, resize 2 and the final resize keep it, JPEG 2 at 100, no blur, no sinc)."""
    n = 4
    deg, draw = _resizes_and_jpegs_only(n, 1.0, 10.0, 100.0, [False] * n)
    on = torch.ones(n, dtype=torch.bool)
    draw["params"].update(resize1_scale=torch.full((n,), 0.25), noise1_gray=on,
                          noise1_sigma=torch.full((n,), 8.0))
    hr = torch.full((n, 3, 128, 128), 0.5)
    lr = deg.apply(hr, draw, gen(9))["lr"]
    assert lr.shape == (n, 3, 32, 32)
    std = lr.flatten(1).std(1) * 255
    assert (std < 2.0).all(), std  # noise then JPEG 10: flat up to a few surviving coefficients
    assert ((lr.mean((1, 2, 3)) - 0.5).abs() < 2 / 255).all()
    # the same draw with JPEG 1 at 100 keeps the noise: the draw does add it
    draw["params"]["jpeg1_quality"] = torch.full((n,), 100.0)
    kept = deg.apply(hr, draw, gen(9))["lr"].flatten(1).std(1) * 255
    assert ((kept - 8.0).abs() < 1.0).all(), kept


@pytest.mark.parametrize("round_", [1, 2])
def test_each_round_blurs_before_it_resizes(round_):
    """Each round is blur -> resize: a known Gaussian (sigma 1.2, written out here) as the
    round's only blur, its resize down to the LR size by area (the other resizes keep the
    size), gray crops and ~lossless JPEG: the LR is the 4 x 4 average of the blurred HR
    (reflect-padded F.conv2d, F.avg_pool2d), far from the blurred 4 x 4 average."""
    n = 3
    deg, draw = _resizes_and_jpegs_only(n, 1.0, 100.0, 100.0, [True] * n)
    r = torch.arange(21, dtype=torch.float32) - 10
    g1 = torch.exp(-r ** 2 / (2 * 1.2 ** 2))
    kernel = torch.outer(g1, g1) / g1.sum() ** 2
    p = draw["params"]
    p[f"blur{round_}_applied"] = torch.ones(n, dtype=torch.bool)
    draw["kernels"][f"blur{round_}"] = kernel.expand(n, 21, 21).clone()
    if round_ == 1:  # resize 1 straight to the LR size, resize 2 (x LR size) keeps it
        p["resize1_scale"] = torch.full((n,), 0.25)
    # round 2: resize 1 keeps the HR size, resize 2 takes it to 1 x the LR size
    hr = photos(n, 64, seed=7).mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()
    lr = deg.apply(hr, draw, gen(9))["lr"]

    def blur(x):
        return F.conv2d(F.pad(x, [10] * 4, mode="reflect"), kernel.expand(3, 1, 21, 21), groups=3)

    first = (F.avg_pool2d(blur(hr), 4) * 255).round() / 255
    last = (blur(F.avg_pool2d(hr, 4)) * 255).round() / 255
    _closer_to_own(lr, first, last)


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-tables", "torch.poisson"])
def test_gray_poisson_noise_is_drawn_on_the_luma(accelerator):
    """Gray Poisson noise is one field drawn on the image's luma (0.299 R + 0.587 G + 0.114 B,
    on the 1/255 grid) and repeated over the channels: on a flat colour (20, 200, 100) its
    variance is scale² · Y / 256 with Y = 135/255, the same in every channel (not that of a
    channel: red alone would give 20/255, a seventh of it)."""
    x = torch.empty(2, 3, 256, 256)
    for c, v in enumerate((20, 200, 100)):
        x[:, c] = v / 255
    x[:, :, 0, :200] = torch.arange(200) / 255  # > 128 distinct luma values: 256 levels
    scale = torch.tensor([1.0, 2.5])
    with ops.accelerator_path(accelerator):
        n = ops.poisson_noise(gen(1), x, scale, torch.tensor([True, True]))
    y = round(0.299 * 20 + 0.587 * 200 + 0.114 * 100) / 255
    for b in range(2):
        assert torch.equal(n[b, 0], n[b, 1]) and torch.equal(n[b, 0], n[b, 2])
        flat = n[b, 0, 1:].double()
        expected_var = scale[b].item() ** 2 * y / 256
        assert abs(flat.var().item() / expected_var - 1) < 0.03, (b, flat.var().item(), expected_var)
        assert abs(flat.mean().item()) < 4 * math.sqrt(expected_var / flat.numel())
