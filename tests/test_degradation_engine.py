"""The engine's faster paths against independent computations: the table-inversion Poisson
sampler (scipy's CDF), the matrix upsampling (F.interpolate), the subset helpers (loops)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from degsr.degradation import ops, poisson
from degsr.degradation.pipeline import Degrader
from degsr.degradation.resize import upsample
from degsr.degradation.resize import RESIZE_MODES, resize_taps


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("e,q", [(8, 255), (8, 128), (8, 3), (6, 100), (2, 200), (0, 255), (8, 0)])
def test_counts_are_the_inverse_cdf_of_their_uniforms(e, q):
    """Each count is min{k : F(k) > u} for its float64 uniform (the first draw of the generator),
    F from scipy; 200k draws reach the far tails (the bracket search) as well."""
    n = 200_000
    rows = torch.full((n,), e * 256 + q)
    got = poisson.sample_counts(rows, gen(3)).double().numpy()
    u = torch.rand(n, generator=gen(3), dtype=torch.float64).numpy()
    lam = 2 ** e * q / 255
    cdf = stats.poisson.cdf(np.arange(poisson.K_MAX), lam)
    expect = np.searchsorted(cdf, u, side="right")
    near = np.abs(cdf[np.clip(expect, 0, poisson.K_MAX - 1)] - u) < 1e-12  # ties at rounding level
    near |= np.abs(cdf[np.clip(expect - 1, 0, poisson.K_MAX - 1)] - u) < 1e-12
    assert (got == expect)[~near].all()
    assert near.mean() < 1e-3
    if lam > 0:
        assert abs(got.mean() / lam - 1) < 6 / math.sqrt(n * lam)


def test_table_rows_and_tails_are_exact():
    cdf, lo_mark, at_lo = poisson.tables(torch.device("cpu"))
    lam = poisson.rates()
    assert lam[8 * 256 + 255] == 256.0 and lam[0] == 0.0
    ref = stats.poisson.cdf(np.arange(poisson.K_MAX)[None], lam.numpy()[:, None])
    np.testing.assert_allclose(cdf[:, :-1].numpy(), ref[:, :-1], rtol=1e-12, atol=1e-14)
    assert (1 - ref[:, -1]).max() < 1e-100  # the truncated tail
    lo = torch.where(lo_mark < 0, -1 - lo_mark, lo_mark).long()
    torch.testing.assert_close(at_lo, torch.gather(cdf, 1, lo))
    assert (lo_mark < 0).double().mean() < 0.01  # the bracket search is the exception


def test_poisson_noise_depends_on_the_generator_only():
    x = torch.rand(3, 3, 40, 40)
    scale, gray = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([False, True, False])
    a = ops.poisson_noise(gen(1), x, scale, gray)
    assert torch.equal(a, ops.poisson_noise(gen(1), x, scale, gray))
    assert not torch.equal(a, ops.poisson_noise(gen(2), x, scale, gray))
    assert torch.equal(a[1, 0], a[1, 2])  # gray: one field over the channels


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest", "area"])
@pytest.mark.parametrize("size", [(64, 64), (48, 36)])
def test_upsample_equals_interpolate(mode, size):
    lr = torch.rand(3, 3, *size, dtype=torch.float64)
    out = (size[0] * 4, size[1] * 4)
    kw = {} if mode in ("nearest", "area") else {"align_corners": False}
    ref = F.interpolate(lr, size=out, mode=mode, **kw).clamp(0, 1)
    torch.testing.assert_close(upsample(lr, out, mode), ref, rtol=0, atol=1e-12)
    got32 = upsample(lr.float(), out, mode)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=0, atol=1e-5)


def test_resize_taps_weights_sum_to_one_and_stay_inside():
    n_in = torch.tensor([100, 40, 17, 9, 64, 30])
    n_out = torch.tensor([7, 17, 40, 10, 19, 30])
    for m in range(len(RESIZE_MODES)):
        modes = torch.full_like(n_in, m)
        index, weight = resize_taps(n_in, n_out, modes, 45, torch.float64)
        torch.testing.assert_close(weight.sum(-1), torch.ones(6, 45, dtype=torch.float64))
        assert (index >= 0).all() and (index < n_in.view(-1, 1, 1)).all()
    assert index.shape[-1] >= math.ceil(100 / 7)  # the widest area bin


def test_split_apply_and_on_subset_match_a_loop():
    x = torch.rand(5, 2, 3, 3)
    mask = torch.tensor([True, False, True, True, False])
    calls = []

    def yes(i):
        calls.append(("yes", i if i is ops.EVERY else i.tolist()))
        return x[i] * 2

    def no(i):
        calls.append(("no", i if i is ops.EVERY else i.tolist()))
        return x[i] - 1

    out = ops.split_apply(mask, x, yes, no)
    assert calls == [("yes", [0, 2, 3]), ("no", [1, 4])]
    for b in range(5):
        torch.testing.assert_close(out[b], x[b] * 2 if mask[b] else x[b] - 1)
    assert torch.equal(ops.split_apply(torch.ones(5, dtype=torch.bool), x, yes, no), x * 2)
    assert torch.equal(ops.split_apply(torch.zeros(5, dtype=torch.bool), x, yes, no), x - 1)
    assert calls[2:] == [("yes", ops.EVERY), ("no", ops.EVERY)]  # all taken: views, no gathers

    ref = torch.where(mask.view(-1, 1, 1, 1), x + 1, x)
    kept = x.clone()
    assert torch.equal(ops.on_subset(mask, x, lambda i: x[i] + 1), ref) and torch.equal(x, kept)
    y = x.clone()
    out = ops.on_subset(mask, y, lambda i: y[i] + 1, inplace=True)
    assert out is y and torch.equal(y, ref)


def test_dense_masks_give_the_subset_results():
    """Dense (every sample computed, the mask applied by torch.where: the accelerator way) equals
    the subset way, for both helpers; the loop reference is the one above."""
    x = torch.rand(5, 2, 3, 3)
    mask = torch.tensor([True, False, True, True, False])
    with ops.dense_masks(True):
        dense = (ops.split_apply(mask, x, lambda i: x[i] * 2, lambda i: x[i] - 1),
                 ops.on_subset(mask, x, lambda i: x[i] + 1))
    with ops.dense_masks(False):
        subset = (ops.split_apply(mask, x, lambda i: x[i] * 2, lambda i: x[i] - 1),
                  ops.on_subset(mask, x, lambda i: x[i] + 1))
    for a, b in zip(dense, subset):
        assert torch.equal(a, b)
    assert not ops.is_dense(x) and ops.is_dense(torch.empty(0, device="meta"))


def test_pipeline_dense_equals_subset_without_noise():
    """The whole chain, dense vs subset, on one draw: equal when the noise is zero (the two ways
    draw different noise fields; everything else, blurs, JPEGs, the clean switch, is the same)."""
    from tests.test_degradation import photos, preset

    zero = [f"degradation.{r}.{k}=[0,0]" for r in ("first", "second")
            for k in ("noise_sigma", "poisson_scale")]
    degrader = Degrader(preset("s3diff", "degradation.no_degradation_prob=0.3",
                              "degradation.second.blur_prob=0.5", *zero))
    hr = photos(12, 64, seed=4)
    outs = []
    for dense in (True, False):
        with ops.dense_masks(dense):
            outs.append(degrader(hr, torch.Generator().manual_seed(9)))
    p = outs[0]["params"]
    for flag in ("blur2_applied", "final_jpeg_first", "clean"):  # both branches taken
        assert p[flag].any() and not p[flag].all()
    for key in ("lr", "lr_up", "scores"):
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=0, atol=1e-6)


def test_accelerator_path_renders_what_the_cpu_path_renders(monkeypatch):
    """The path an accelerator takes (dense masks, FFT blur, torch.poisson, its resize groups),
    taken on the CPU, against the CPU path on one draw without noise: the same LRs and labels
    up to float rounding (FFT vs direct sums: at most a rare level flip after quantisation)."""
    from degsr.degradation import filtering, pipeline
    from tests.test_degradation import photos, preset

    zero = [f"degradation.{r}.{k}=[0,0]" for r in ("first", "second")
            for k in ("noise_sigma", "poisson_scale")]
    degrader = Degrader(preset("s3diff", "degradation.no_degradation_prob=0.3", *zero))
    hr = photos(16, 96, seed=4)
    monkeypatch.setattr(pipeline, "GROUP_COST", pipeline.ACCEL_GROUP_COST)  # the same canvases
    ffts = []
    fft = filtering.fft_filter
    monkeypatch.setattr(filtering, "fft_filter", lambda *a: ffts.append(1) or fft(*a))
    outs = []
    for accelerator in (False, True):
        with ops.accelerator_path(accelerator):
            outs.append(degrader(hr, torch.Generator().manual_seed(9)))
    assert ffts and not ops.on_accelerator(hr.device)  # taken, and only inside the block
    cpu, acc = outs
    for key in ("lr", "lr_up", "scores"):
        torch.testing.assert_close(acc[key], cpu[key], rtol=0, atol=1 / 255 + 1e-6)
    assert (acc["lr"] != cpu["lr"]).float().mean() < 0.01


def test_plan_groups_cover_the_batch_once():
    """Whatever the group cost, the groups of resize 1 partition the batch and each group's
    matrices fit its canvas (its largest size) with rows that average their taps."""
    from degsr.degradation import pipeline
    from tests.test_degradation import preset

    degrader = Degrader(preset("s3diff"))
    draw = degrader.sample(16, torch.Generator().manual_seed(2))
    p = draw["params"]
    for cost in (0.0, pipeline.GROUP_COST, pipeline.ACCEL_GROUP_COST, 1e9):
        saved, pipeline.GROUP_COST = pipeline.GROUP_COST, cost
        try:
            plan = degrader._plans(p, degrader._host_scales(p), [(64, 48)], torch.float32)[0]
        finally:
            pipeline.GROUP_COST = saved
        idx = torch.cat([g["idx"] for g in plan["groups"]])
        assert sorted(idx.tolist()) == list(range(16))
        assert len(plan["groups"]) == {0.0: 16, 1e9: 1}.get(cost, len(plan["groups"]))
        for g in plan["groups"]:
            rh, rw = g["r1"]
            assert rh.shape[1:] == (int((64 * p["resize1_scale"][g["idx"]]).long().max()), 64)
            assert rw.shape[1:] == (int((48 * p["resize1_scale"][g["idx"]]).long().max()), 48)
            torch.testing.assert_close(rh.sum(-1), torch.ones(rh.shape[:2]))  # rows are averages
            assert g["r2"][0].shape[-1] == rh.shape[1] and g["r2"][1].shape[-1] == rw.shape[1]


def test_partition_by_area_is_the_brute_force_optimum():
    import itertools

    from degsr.degradation.pipeline import partition_by_area

    scales = sorted([0.3, 0.35, 0.5, 0.52, 0.9, 1.0, 1.0, 1.2, 1.45])
    n = len(scales)
    for cost in (0.1, 1.0, 5.0):
        def total(cuts):
            return sum((j - i) * scales[j - 1] ** 2 + cost for i, j in zip(cuts[:-1], cuts[1:]))

        best = min(total([0, *inner, n]) for k in range(n)
                   for inner in itertools.combinations(range(1, n), k))
        cuts = partition_by_area(scales, cost)
        assert cuts[0] == 0 and cuts[-1] == n and cuts == sorted(set(cuts))
        assert math.isclose(total(cuts), best)
    assert partition_by_area([1.0], 1.0) == [0, 1]


@pytest.mark.parametrize("size", [(64, 64), (50, 47)])
def test_fft_filter_matches_direct_correlation(size):
    """The FFT path (accelerators) against a float64 direct cross-correlation (asymmetric kernels)."""
    from degsr.degradation.filtering import fft_filter

    torch.manual_seed(0)
    imgs = torch.rand(3, 2, *size, dtype=torch.float64)
    kers = torch.rand(3, 21, 21, dtype=torch.float64)
    kers /= kers.sum((1, 2), keepdim=True)
    for b in range(3):
        x = F.pad(imgs[b:b + 1], [10] * 4, mode="reflect")
        ref = F.conv2d(x, kers[b].expand(2, 1, 21, 21), groups=2)
        torch.testing.assert_close(fft_filter(imgs, kers)[b:b + 1], ref, rtol=0, atol=1e-12)
        got32 = fft_filter(imgs.float(), kers.float())[b:b + 1]
        torch.testing.assert_close(got32.double(), ref, rtol=0, atol=2e-6)


def test_poisson_noise_of_active_samples_is_unchanged():
    """``active`` (the dense way: the samples whose noise is kept) leaves their noise exactly as
    drawn without it, from the same stream; the others draw Poisson(0)."""
    x = torch.rand(4, 3, 24, 24)
    scale, gray = torch.tensor([1.0, 0.5, 2.0, 1.5]), torch.tensor([False, True, False, True])
    active = torch.tensor([True, True, False, False])
    full = ops.poisson_noise(gen(5), x, scale, gray)
    part = ops.poisson_noise(gen(5), x, scale, gray, active)
    assert torch.equal(part[:2], full[:2])
    q = (x * 255).round() / 255
    torch.testing.assert_close(part[2], -q[2] * 2.0)  # counts 0: the noise is -v * scale


def _interp_matrix(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of F.interpolate along one axis (PyTorch's own kernels)."""
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, 1, n_in)
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(eye, size=(1, n_out), mode=mode, **kw)[:, 0, 0].T


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_plan_matrices_equal_interpolate_for_steep_downscales(mode):
    """The call's resize plan (the matrices with the tap bound the pipeline passes) against
    F.interpolate per sample, for factors down to 0.29: an area bin of 64 -> 18 spans up to 5
    source rows, more than the 4 bicubic taps. Two input sizes in one plan (as the LR render and
    the blur label's probe): the smaller one's rows ride padded in the larger one's taps."""
    from tests.test_degradation import preset

    degrader = Degrader(preset("s3diff"))
    p = dict(degrader.sample(4, gen(2))["params"])
    mode_id = torch.full((4,), RESIZE_MODES.index(mode))
    # no factor x side lands on an integer: float32 and float64 floor alike
    p.update(resize1_scale=torch.tensor([0.29, 0.31, 0.46, 1.0]), resize1_mode=mode_id,
             resize2_scale=torch.tensor([0.3, 0.5, 1.23, 0.31]), resize2_mode=mode_id,
             final_mode=mode_id)
    sizes = [(128, 116), (64, 60)]
    plans = degrader._plans(p, degrader._host_scales(p), sizes, torch.float64)
    assert len(plans) == 2
    for hw, plan in zip(sizes, plans):
        lr = (hw[0] // 4, hw[1] // 4)
        size1 = [[int(n * float(s)) for n in hw] for s in p["resize1_scale"]]
        size2 = [[int(n * float(s)) for n in lr] for s in p["resize2_scale"]]
        for g in plan["groups"]:
            for row, b in enumerate(g["idx"].tolist()):
                for axis in (0, 1):
                    m1 = g["r1"][axis][row]
                    assert m1.shape[-1] == hw[axis]
                    want1 = _interp_matrix(hw[axis], size1[b][axis], mode)
                    torch.testing.assert_close(m1[:size1[b][axis]], want1, rtol=0, atol=1e-12)
                    m2 = g["r2"][axis][row]
                    want2 = _interp_matrix(size1[b][axis], size2[b][axis], mode)
                    torch.testing.assert_close(m2[:size2[b][axis], :size1[b][axis]], want2, rtol=0, atol=1e-12)
        assert plan["canvas2"] == tuple(max(s[axis] for s in size2) for axis in (0, 1))
        for b in range(4):
            for axis in (0, 1):
                mf = plan["final"][axis][b]
                assert mf.shape == (lr[axis], plan["canvas2"][axis])
                want = _interp_matrix(size2[b][axis], lr[axis], mode)
                torch.testing.assert_close(mf[:, :size2[b][axis]], want, rtol=0, atol=1e-12)


def test_an_empty_batch_is_named_before_any_draw():
    """0 samples: one clear ValueError at the entry (it was a bare ``max()`` error deep in the
    resize plan), with the generator untouched; ``apply`` on its own says the same."""
    from degsr.config.schema import DegradationConfig

    degrader, g = Degrader(DegradationConfig()), gen(0)
    state = g.get_state()
    msg = r"needs at least one image, got an empty batch of shape \(0, 3, 64, 48\)"
    with pytest.raises(ValueError, match=msg):
        degrader(torch.zeros(0, 3, 64, 48), g)
    assert torch.equal(g.get_state(), state)
    with pytest.raises(ValueError, match=msg):
        degrader.apply(torch.zeros(0, 3, 64, 48), degrader.sample(0, gen(1)), gen(1))
