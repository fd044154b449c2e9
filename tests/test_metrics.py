"""Metrics: LPIPS (plain-torch VGG16 + lin) and Y-channel PSNR/SSIM, against independent references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from degsr.errors import UserError
from degsr.metrics import LPIPS, VGG16Features, default_lin_path, psnr_y, ssim_y

# ---------------------------------------------------------------------------------------------
# VGG16 layout, written by hand from the architecture (Simonyan & Zisserman, config D) as laid out
# in torchvision's vgg16().features: conv3x3 + ReLU, max-pool after each block.
# ---------------------------------------------------------------------------------------------
VGG16_CONVS = [  # (index in features, out_channels)
    (0, 64), (2, 64),
    (5, 128), (7, 128),
    (10, 256), (12, 256), (14, 256),
    (17, 512), (19, 512), (21, 512),
    (24, 512), (26, 512), (28, 512),
]
POOLS = {4, 9, 16, 23, 30}
TAPS = [3, 8, 15, 22, 29]  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SHIFT = [-0.030, -0.088, -0.188]
SCALE = [0.458, 0.448, 0.450]


def expected_vgg_shapes():
    shapes, cin = {}, 3
    for idx, cout in VGG16_CONVS:
        shapes[f"features.{idx}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{idx}.bias"] = (cout,)
        cin = cout
    return shapes


def torchvision_style_state_dict(seed=0, full=True):
    """A state dict in torchvision's vgg16 key format, built by hand (no torchvision)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(*s, generator=g) * 0.05 for k, s in expected_vgg_shapes().items()}
    if full:  # the classifier part of vgg16-397923af.pth (shapes shrunk: it must be ignored)
        sd["classifier.0.weight"] = torch.randn(8, 16, generator=g)
        sd["classifier.0.bias"] = torch.randn(8, generator=g)
        return sd
    return {k[len("features."):]: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def lpips_model():
    return LPIPS.random(seed=3, lin_path=default_lin_path())


def test_vgg16_features_layout_matches_torchvision():
    net = VGG16Features()
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == expected_vgg_shapes()
    assert [n for n, _ in net.named_parameters()] == list(expected_vgg_shapes())
    assert len(net.features) == 31
    for i, m in enumerate(net.features):
        if i in POOLS:
            assert isinstance(m, torch.nn.MaxPool2d) and m.kernel_size == 2 and m.stride == 2
        elif i in dict(VGG16_CONVS):
            assert m.kernel_size == (3, 3) and m.padding == (1, 1)
        else:
            assert isinstance(m, torch.nn.ReLU)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
        outs = net(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [
        (1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4), (1, 512, 2, 2)]
    assert all((o >= 0).all() and (o == 0).any() and (o > 0).any() for o in outs)  # post-ReLU taps


@pytest.mark.parametrize("full", [True, False])
def test_vgg16_loads_torchvision_state_dict(tmp_path, full):
    sd = torchvision_style_state_dict(seed=1, full=full)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(sd, path)
    net = VGG16Features()
    net.load_file(path)
    for k, v in net.state_dict().items():
        src = sd[k] if full else sd[k[len("features."):]]
        assert torch.equal(v, src), k


def test_vgg16_missing_key_is_user_error(tmp_path):
    sd = torchvision_style_state_dict()
    del sd["features.14.bias"]
    path = tmp_path / "broken_vgg.pth"
    torch.save(sd, path)
    with pytest.raises(UserError) as ei:
        VGG16Features().load_file(path)
    msg = str(ei.value)
    assert "broken_vgg.pth" in msg and "features.14.bias" in msg and "\n" not in msg


def test_vgg16_bad_files_are_user_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    for path in (corrupt, tmp_path / "absent.pth"):
        with pytest.raises(UserError, match=path.name):
            LPIPS.from_files(path)
    sd = torchvision_style_state_dict()
    sd["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(UserError, match="shape.pth"):
        LPIPS.from_files(tmp_path / "shape.pth")


def test_real_lpips_without_vgg_file_says_what_to_pass():
    with pytest.raises(UserError, match="vgg16-397923af.pth"):
        LPIPS.from_files(None)


def test_lin_weights_from_package(tmp_path):
    path = default_lin_path()
    assert path.name == "vgg.pth" and path.is_file()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(raw) == [f"lin{k}.model.1.weight" for k in range(5)]
    vgg = tmp_path / "vgg16.pth"
    torch.save(torchvision_style_state_dict(seed=2), vgg)
    m = LPIPS.from_files(vgg)  # lin weights default to the packaged file
    for k, lin in enumerate(m.lins):
        assert torch.equal(lin.weight, raw[f"lin{k}.model.1.weight"])
        assert lin.bias is None and (lin.weight >= 0).all()
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    # mismatched lin file
    bad = dict(raw)
    bad["lin4.model.1.weight"] = torch.ones(1, 256, 1, 1)
    torch.save(bad, tmp_path / "lin_bad.pth")
    with pytest.raises(UserError, match="lin_bad.pth"):
        LPIPS.from_files(vgg, tmp_path / "lin_bad.pth")
    del bad["lin4.model.1.weight"]
    torch.save(bad, tmp_path / "lin_missing.pth")
    with pytest.raises(UserError, match="lin_missing.pth"):
        LPIPS.from_files(vgg, tmp_path / "lin_missing.pth")


def test_lpips_basic_properties(lpips_model):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 48, 48, generator=g) * 2 - 1
    y = torch.rand(3, 3, 48, 48, generator=g) * 2 - 1
    d = lpips_model(x, y)
    assert d.shape == (3,)
    assert torch.equal(lpips_model(x, x), torch.zeros(3))
    torch.testing.assert_close(lpips_model(y, x), d)
    assert (d > 0).all()
    # normalize=True takes [0, 1] inputs
    torch.testing.assert_close(lpips_model((x + 1) / 2, (y + 1) / 2, normalize=True), d)
    # stays frozen in eval mode, gradients reach the input
    lpips_model.train()
    assert not lpips_model.training
    xr = x.clone().requires_grad_(True)
    lpips_model(xr, y).sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_model.parameters())


def reference_lpips(model, x, y):
    """LPIPS from the formula, float64, straight from the state dict tensors."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    shift = torch.tensor(SHIFT, dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor(SCALE, dtype=torch.float64).view(1, 3, 1, 1)
    convs = dict(VGG16_CONVS)

    def features(img):
        h, taps = (img.double() - shift) / scale, []
        for i in range(TAPS[-1] + 1):
            if i in convs:
                h = F.conv2d(h, sd[f"net.features.{i}.weight"], sd[f"net.features.{i}.bias"], padding=1)
            elif i in POOLS:
                h = F.max_pool2d(h, 2, 2)
            else:
                h = torch.clamp(h, min=0)
            if i in TAPS:
                taps.append(h)
        return taps

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(features(x), features(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = sd[f"lins.{k}.weight"].view(1, -1, 1, 1)
        total += ((a - b) ** 2 * w).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_matches_float64_reference(lpips_model):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 64, 48, generator=g)).clamp(-1, 1)
    got = lpips_model(x, y).double()
    ref = reference_lpips(lpips_model, x, y)
    assert (ref > 0).all()
    # float32 model vs float64 formula: observed differences ~1e-9
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# PSNR / SSIM on Y
# ---------------------------------------------------------------------------------------------
def y_numpy(img):
    """(3, H, W) RGB in [0, 1] -> Y on 0..255, float64 (BT.601 studio range, BasicSR's formula)."""
    r, g, b = np.asarray(img, dtype=np.float64)
    return 16.0 + (65.481 * r * 255 + 128.553 * g * 255 + 24.966 * b * 255) / 255.0


def pair(seed=0, b=2, h=40, w=36, noise=0.08):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)
    pred = (gt + noise * torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)).clamp(0, 1)
    return pred, gt


def test_psnr_constant_offset_closed_form():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 0.8
    d = 0.1
    pred = gt + d
    # Y offset = d * (65.481 + 128.553 + 24.966) = 219 d on the 0..255 scale
    expected = 10 * np.log10(255.0**2 / (219.0 * d) ** 2)
    torch.testing.assert_close(psnr_y(pred, gt), torch.full((2,), expected, dtype=torch.float64))
    assert torch.isinf(psnr_y(gt, gt)).all()


def test_psnr_matches_skimage_on_y():
    pred, gt = pair(seed=1)
    got = psnr_y(pred, gt)
    for i in range(pred.shape[0]):
        ref = peak_signal_noise_ratio(y_numpy(gt[i]), y_numpy(pred[i]), data_range=255)
        assert got[i].item() == pytest.approx(ref, rel=1e-12)


def test_ssim_matches_skimage_on_y():
    # skimage (gaussian_weights, sigma 1.5 -> 11x11 window with its default truncate=3.5) filters
    # with reflect padding but averages only the map cropped by 5 px per side; those pixels see no
    # padding, so its mean equals BasicSR's 'valid' SSIM exactly (up to float64 rounding).
    pred, gt = pair(seed=2, noise=0.15)
    got = ssim_y(pred, gt)
    assert got.shape == (2,)
    for i in range(pred.shape[0]):
        ref = structural_similarity(y_numpy(gt[i]), y_numpy(pred[i]), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255)
        assert got[i].item() == pytest.approx(ref, abs=1e-10)
    torch.testing.assert_close(ssim_y(gt, gt), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(ssim_y(pred, gt), ssim_y(gt, pred))


def test_crop_border_respected():
    pred, gt = pair(seed=3, h=44, w=40)
    c = 4
    # change only the border: cropped metrics ignore it
    bordered = gt.clone()
    bordered[..., :c, :] = 0.0
    bordered[..., :, -c:] = 1.0
    assert torch.isinf(psnr_y(bordered, gt, crop_border=c)).all()
    assert torch.isfinite(psnr_y(bordered, gt)).all()
    torch.testing.assert_close(ssim_y(bordered, gt, crop_border=c), torch.ones(2, dtype=torch.float64))
    # and equal the metric of the cropped arrays, per skimage on Y
    for i in range(pred.shape[0]):
        yp, yg = y_numpy(pred[i])[c:-c, c:-c], y_numpy(gt[i])[c:-c, c:-c]
        assert psnr_y(pred, gt, crop_border=c)[i].item() == pytest.approx(
            peak_signal_noise_ratio(yg, yp, data_range=255), rel=1e-12)
        assert ssim_y(pred, gt, crop_border=c)[i].item() == pytest.approx(
            structural_similarity(yg, yp, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=255), abs=1e-10)


def test_fidelity_rejects_bad_input():
    pred, gt = pair()
    with pytest.raises(ValueError):
        psnr_y(pred, gt[:, :, :-1])
    with pytest.raises(ValueError):
        ssim_y(pred[..., :12, :12], gt[..., :12, :12], crop_border=1)
    with pytest.raises(ValueError):
        psnr_y(pred, gt, crop_border=-1)


# ---------------------------------------------------------------------------------------------
# DISTS: the network by hand in float64 (VGG16 convs from the state dict, L2 pooling with the
# 3-tap Hann window [1/2, 1, 1/2] written out), the formula from torchmetrics' own DISTSNetwork.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dists_model():
    from degsr.metrics import DISTS

    return DISTS.random(seed=5)


def reference_dists_features(model, img):
    sd = {k: v.double() for k, v in model.state_dict().items()}
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    hann = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    window = torch.outer(hann, hann) / 4.0
    convs = dict(VGG16_CONVS)
    h, taps = (img.double() - mean) / std, [img.double()]
    for i in range(TAPS[-1] + 1):
        if i in convs:
            h = F.conv2d(h, sd[f"net.features.{i}.weight"], sd[f"net.features.{i}.bias"], padding=1)
        elif i in POOLS:  # L2 pooling: sqrt(window * x^2), stride 2, zero padding 1
            c = h.shape[1]
            h = (F.conv2d(h ** 2, window.expand(c, 1, 3, 3), stride=2, padding=1, groups=c)
                 + 1e-12).sqrt()
        else:
            h = torch.clamp(h, min=0)
        if i in TAPS:
            taps.append(h)
    return taps


def test_dists_matches_float64_reference(dists_model):
    from torchmetrics.functional.image.dists import DISTSNetwork

    class Reference:  # what torchmetrics' DISTSNetwork.forward reads from its network
        chns = [3, 64, 128, 256, 512, 512]
        alpha = dists_model.weights.alpha.double()
        beta = dists_model.weights.beta.double()

        def forward_once(self, img):
            return reference_dists_features(dists_model, img)

    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 72, 56, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 72, 56, generator=g)).clamp(0, 1)
    got = dists_model(x, y).double()
    ref = DISTSNetwork.forward(Reference(), x.double(), y.double())
    assert (ref > 0.001).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_dists_basic_properties(dists_model):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, 40, 40, generator=g)
    y = torch.rand(3, 3, 40, 40, generator=g)
    torch.testing.assert_close(dists_model(x, x), torch.zeros(3), atol=1e-6, rtol=0)  # closed form
    torch.testing.assert_close(dists_model(y, x), dists_model(x, y))
    xr = x.clone().requires_grad_(True)
    dists_model(xr, y).sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    dists_model.train()
    assert not dists_model.training and not any(p.requires_grad for p in dists_model.parameters())


def test_dists_weights_from_package(tmp_path):
    from degsr.metrics import DISTS, default_dists_path

    path = default_dists_path()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(raw) == ["alpha", "beta"] and raw["alpha"].shape == (1, 1475, 1, 1)
    vgg = tmp_path / "vgg16.pth"
    torch.save(torchvision_style_state_dict(seed=2), vgg)
    m = DISTS.from_files(vgg)
    assert torch.equal(m.weights.alpha, raw["alpha"]) and torch.equal(m.weights.beta, raw["beta"])
    assert torch.equal(m.net.features[0].weight, torchvision_style_state_dict(seed=2)["features.0.weight"])
    torch.save({"alpha": raw["alpha"]}, tmp_path / "half.pt")
    with pytest.raises(UserError, match=r"half\.pt: .*missing keys"):
        DISTS.from_files(vgg, tmp_path / "half.pt")
    torch.save({"alpha": -raw["alpha"], "beta": raw["beta"]}, tmp_path / "neg.pt")
    with pytest.raises(UserError, match=r"neg\.pt: .*non-negative"):
        DISTS.from_files(vgg, tmp_path / "neg.pt")
    with pytest.raises(UserError, match="vgg16-397923af.pth"):
        DISTS.from_files(None)
