"""Stage-2 vision-aided discriminator: backbone loading, freezing, no G->D gradient leak, the
multi-level sigmoid loss, DiffAugment, spectral norm, the ViT-B/16 size."""

from __future__ import annotations

import json

import pytest
import torch

from degsr.errors import UserError
from degsr.sr import diffaug
from degsr.sr.config import DiscConfig
from degsr.sr.discriminator import (VisionAidedDiscriminator, build_discriminator, load_backbone,
                                    save_tiny_backbone)



SIZE = 64  # tiny ViT at 64² (4 x 4 patch grid)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny_vit"), image_size=SIZE)


def make(folder, **kw) -> VisionAidedDiscriminator:
    torch.manual_seed(0)
    cfg = DiscConfig(**{"backbone": str(folder), "input_size": SIZE, "head_channels": 16, **kw})
    return build_discriminator(cfg)


def images(n, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# backbone loading
# ------------------------------------------------------------------------------------------------

def test_tiny_backbone_roundtrip_and_levels(tiny_folder):
    d = make(tiny_folder)
    assert d.backbone.config.model_type == "vit"
    assert d.levels == [5, 9, 12] and len(d.heads) == 3
    x = images(2)
    lg = d.logits(x, gen())
    assert [tuple(t.shape) for t in lg] == [(2, 1, 1), (2, 1, 1), (2, 1)]
    # the last level is the CLS token of the final (LayerNorm-ed) block
    d_plain = make(tiny_folder, diffaug="")
    feats = d_plain.features(x)
    pix = torch.nn.functional.interpolate(x * 0.5 + 0.5, size=(SIZE, SIZE), mode="area")
    pix = (pix - d_plain.mean) / d_plain.std
    ref = d_plain.backbone(pixel_values=pix).last_hidden_state
    torch.testing.assert_close(feats[-1], ref[:, 0])
    assert feats[0].shape == (2, 32, 4, 4)


def test_missing_folder_and_wrong_type(tmp_path):
    from pathlib import Path

    from degsr.config import load_config

    with pytest.raises(UserError, match="disc.backbone.*not found.*nowhere"):
        load_backbone(tmp_path / "nowhere")
    tiny = Path(__file__).resolve().parents[1] / "configs/sr_tiny.yaml"
    with pytest.raises(UserError, match="disc.backbone: path does not exist"):  # at config time
        load_config([tiny], [f"disc.backbone={tmp_path / 'nowhere'}"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_backbone(empty)
    other = tmp_path / "dinov2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(UserError, match="disc.backbone.*dinov2.*'dinov2' model") as e:
        build_discriminator(DiscConfig(backbone=str(other)))
    assert "\n" not in str(e.value)


def test_damaged_or_incomplete_backbone_weights_are_one_line(tiny_folder, tmp_path):
    """As the base model's folder: a git-lfs pointer, a truncated file, or weights that lack
    tensors (transformers would fill them with random values and go on) name disc.backbone."""
    import shutil

    from safetensors.torch import load_file, save_file

    weights = tiny_folder / "model.safetensors"
    full = weights.read_bytes()
    tensors = load_file(weights)
    cases = {"pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n",
             "cut": full[:len(full) // 2], "lacking": None}
    for name, data in cases.items():
        folder = tmp_path / name
        shutil.copytree(tiny_folder, folder)
        if data is None:
            save_file({k: v for k, v in tensors.items() if ".layer.1." not in k},
                      str(folder / "model.safetensors"), metadata={"format": "pt"})
        else:
            (folder / "model.safetensors").write_bytes(data)
        with pytest.raises(UserError, match=r"^disc\.backbone: ") as e:
            load_backbone(folder)
        assert "\n" not in str(e.value) and str(folder) in str(e.value), (name, str(e.value))
    assert load_backbone(tiny_folder).config.model_type == "vit"


def test_bad_levels_and_size(tiny_folder):
    with pytest.raises(UserError, match="disc.levels.*13"):
        make(tiny_folder, levels=[5, 13])
    with pytest.raises(UserError, match="disc.input_size"):
        make(tiny_folder, input_size=72)
    with pytest.raises(UserError, match="disc.diffaug"):
        make(tiny_folder, diffaug="color,zoom")


# ------------------------------------------------------------------------------------------------
# freezing and the gradient leak
# ------------------------------------------------------------------------------------------------

def test_backbone_frozen_heads_train(tiny_folder):
    d = make(tiny_folder)
    d.train()
    d.requires_grad_(True)  # must not unfreeze the backbone
    assert not d.backbone.training and d.heads.training
    assert not any(p.requires_grad for p in d.backbone.parameters())
    assert all(p.requires_grad for p in d.head_parameters())
    d.loss_d(images(2), images(2, seed=1), gen()).backward()
    assert all(p.grad is None for p in d.backbone.parameters())
    grads = [p.grad for p in d.head_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_generator_step_does_not_leak_into_heads(tiny_folder):
    d = make(tiny_folder).train()
    fake = images(2).requires_grad_(True)
    with d.frozen_heads():
        assert not any(p.requires_grad for p in d.head_parameters())
        d.loss_g(fake, gen()).backward()
    assert all(p.grad is None or not p.grad.any() for p in d.head_parameters())
    assert all(p.grad is None for p in d.backbone.parameters())
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.requires_grad for p in d.head_parameters())  # restored
    # the D step on the same fake: heads get gradients, the generator's output none
    fake.grad = None
    d.loss_d(images(2, seed=3), fake, gen()).backward()
    assert fake.grad is None
    assert any(p.grad is not None and p.grad.any() for p in d.head_parameters())


def test_frozen_heads_restores_on_error(tiny_folder):
    d = make(tiny_folder)
    first = next(d.head_parameters())
    first.requires_grad_(False)  # a pre-existing state is restored as it was
    with pytest.raises(RuntimeError):
        with d.frozen_heads():
            raise RuntimeError("boom")
    flags = [p.requires_grad for p in d.head_parameters()]
    assert flags[0] is False and all(flags[1:])


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------

def _bce(x, y):
    s = torch.sigmoid(x.double())
    return -(y * torch.log(s) + (1 - y) * torch.log(1 - s)).mean()


def test_loss_d_and_loss_g_match_hand_computation(tiny_folder):
    d = make(tiny_folder).eval()  # eval: spectral norm keeps u, v, so calls agree
    real, fake = images(3), images(3, seed=1)
    lg = d.logits(torch.cat([real, fake]), gen(7))
    want = sum(_bce(t[:3], 0.8) + _bce(t[3:], 0.0) for t in lg)
    got = d.loss_d(real, fake, gen(7))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    lg = d.logits(fake, gen(8))
    want_g = sum(_bce(t, 0.8) for t in lg)
    torch.testing.assert_close(d.loss_g(fake, gen(8)).double(), want_g, rtol=1e-5, atol=1e-6)
    assert d.real_label == 0.8


# ------------------------------------------------------------------------------------------------
# DiffAugment
# ------------------------------------------------------------------------------------------------

def test_diffaugment_deterministic_with_generator():
    x = images(4, 32)
    a = diffaug.diff_augment(x, "color,translation,cutout", gen(1))
    b = diffaug.diff_augment(x, "color,translation,cutout", gen(1))
    c = diffaug.diff_augment(x, "color,translation,cutout", gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(diffaug.diff_augment(x, "", gen(1)), x)


def test_translation_is_a_zero_filled_shift():
    x = images(6, 16) + 3.0  # no zeros inside the image
    out = diffaug.translation(x, gen(3))
    assert out.shape == x.shape
    r = int(16 * 0.125 + 0.5)
    for b in range(6):
        hits = 0
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                ref = torch.zeros_like(x[b])
                ys, yd = (slice(dy, 16), slice(0, 16 - dy)) if dy >= 0 else \
                    (slice(0, 16 + dy), slice(-dy, 16))
                xs, xd = (slice(dx, 16), slice(0, 16 - dx)) if dx >= 0 else \
                    (slice(0, 16 + dx), slice(-dx, 16))
                ref[:, yd, xd] = x[b][:, ys, xs]
                hits += torch.equal(out[b], ref)
        assert hits == 1


def test_cutout_area():
    n, h = 4000, 32
    x = torch.ones(n, 3, h, h)
    out = diffaug.cutout(x, gen(4))
    assert torch.equal(out[:, 0], out[:, 1])  # same box for all channels
    frac = (out[:, 0] == 0).float().mean(dim=(1, 2))
    assert frac.max() <= 0.25 + 1e-6 and frac.min() >= 1 / 16 - 1e-6
    # centre uniform on 0..h (box h/2, clipped): expected zeroed length per axis, squared
    c = torch.arange(h + 1).float()
    length = (torch.clamp(c + h // 4, max=h) - torch.clamp(c - h // 4, min=0)) / h
    expected = length.mean() ** 2  # ~ (7/16)^2 ~ 0.19
    assert abs(frac.mean() - expected) < 0.01


def test_color_ops_formulas_on_constant_image():
    vals = torch.tensor([0.3, -0.2, 0.5]).view(1, 3, 1, 1)
    x = vals.expand(5, 3, 8, 8).clone()
    u = torch.rand(5, 1, 1, 1, generator=gen(9))
    torch.testing.assert_close(diffaug.brightness(x, gen(9)), x + u - 0.5)
    m_c = vals.mean()
    torch.testing.assert_close(diffaug.saturation(x, gen(9)), m_c + (x - m_c) * 2 * u)
    torch.testing.assert_close(diffaug.contrast(x, gen(9)), m_c + (x - m_c) * (u + 0.5))
    gray = torch.full((5, 3, 8, 8), 0.4)  # a gray image is a fixed point of both
    torch.testing.assert_close(diffaug.saturation(gray, gen(9)), gray)
    torch.testing.assert_close(diffaug.contrast(gray, gen(9)), gray)


# ------------------------------------------------------------------------------------------------
# spectral norm and size
# ------------------------------------------------------------------------------------------------

def test_heads_are_spectrally_normalised(tiny_folder):
    d = make(tiny_folder).train()
    with torch.no_grad():
        d.logits(images(2), gen())  # the full path in train mode, then more power iterations
        feats = d.features(images(2))
        for _ in range(30):
            for head, f in zip(d.heads, feats):
                head(f)
    layers = [m for m in d.heads.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 6
    for m in layers:
        assert torch.nn.utils.parametrize.is_parametrized(m, "weight")
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        assert abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0) < 0.02


def test_dino_vitb16_size_on_meta():
    with torch.device("meta"):
        d = build_discriminator(DiscConfig(arch="dino-vitb16"))
    n = sum(p.numel() for p in d.backbone.parameters())
    assert abs(n - 86e6) / 86e6 < 0.02
    assert d.grid == 14 and [len(h) for h in d.heads] == [5, 5, 3]


@torch.no_grad()
def test_features_are_layernormed_patch_grids_and_cls_with_the_documented_normalisation(
        tiny_folder):
    """features() by hand for both disc.norm settings: [-1, 1] -> [0, 1] -> area resize ->
    (x - mean) / std with the constants written out (ImageNet's; the reference's CLIP mean with
    ImageNet's std) -> ViT; every level passed through the final LayerNorm; the grid levels are
    the patch tokens 1..g² laid out row-major (token 1 + i g + j at (i, j)), the last the CLS."""
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    means = {"imagenet": (0.485, 0.456, 0.406), "reference": (0.48145466, 0.4578275, 0.40821073)}
    x = images(2)
    for norm, mean in means.items():
        d = make(tiny_folder, diffaug="", norm=norm).eval()
        feats = d.features(x)
        pix = torch.nn.functional.interpolate(x * 0.5 + 0.5, size=(SIZE, SIZE), mode="area")
        pix = (pix - torch.tensor(mean).view(1, 3, 1, 1)) / imagenet_std
        hs = d.backbone(pixel_values=pix, output_hidden_states=True).hidden_states
        ln, g = d.backbone.layernorm, SIZE // 16
        for f, level in zip(feats[:-1], d.levels[:-1]):
            h = ln(hs[level])
            assert f.shape == (2, h.shape[-1], g, g)
            for i in range(g):
                for j in range(g):
                    torch.testing.assert_close(f[:, :, i, j], h[:, 1 + i * g + j], rtol=1e-5,
                                               atol=1e-5)
        torch.testing.assert_close(feats[-1], ln(hs[d.levels[-1]])[:, 0], rtol=1e-5, atol=1e-5)
    # the two normalisations are far enough apart for the check to tell them apart
    assert abs(means["imagenet"][0] - means["reference"][0]) / 0.229 > 0.01


@torch.no_grad()
def test_heads_match_the_reference_layout_written_out_in_float64(tiny_folder):
    """logits() from features() by hand at DINO's 14 x 14 grid (input 224, the tiny ViT's
    position embeddings interpolated): each grid level is zero-pad 2 -> 4 x 4 binomial blur
    ([1, 3, 3, 1] ⊗ [1, 3, 3, 1] / 64, written as shifted sums) -> conv 3x3 stride 2 ->
    LeakyReLU(0.2) -> zero-pad 1 -> blur -> conv 1x1 stride 2 (a 3 x 3 logit map); the last
    level's CLS token -> linear -> LeakyReLU(0.2) -> linear. The convs' weights are the heads'
    (spectrally normalised) weights; the norm itself is tested above."""
    import torch.nn.functional as F

    d = make(tiny_folder, diffaug="", input_size=224).eval()
    with torch.no_grad():  # trained-looking heads: biases and slopes matter
        for p in d.heads.parameters():
            p.normal_(0, 0.3, generator=gen(5))
    x = images(2, size=96)
    feats, got = d.features(x), d.logits(x)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)

    def blur(h, pad):
        h = F.pad(h, [pad] * 4)
        n = h.shape[-1] - 3
        return sum(taps[i] * taps[j] / 64 * h[..., i:i + n, j:j + n]
                   for i in range(4) for j in range(4))

    def leaky(h):
        return torch.where(h > 0, h, 0.2 * h)

    def w(m):
        return m.weight.double(), m.bias.double()

    for head, f, lg in zip(d.heads[:-1], feats[:-1], got[:-1]):
        assert f.shape[-2:] == (14, 14)
        convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
        h = F.conv2d(blur(f.double(), 2), *w(convs[0]), stride=2)
        h = F.conv2d(blur(leaky(h), 1), *w(convs[1]), stride=2)
        assert lg.shape == (2, 3, 3)
        torch.testing.assert_close(lg.double(), h[:, 0], rtol=1e-5, atol=1e-5)
    lins = [m for m in d.heads[-1].modules() if isinstance(m, torch.nn.Linear)]
    h = leaky(feats[-1].double() @ w(lins[0])[0].T + w(lins[0])[1])
    want = h @ w(lins[1])[0].T + w(lins[1])[1]
    torch.testing.assert_close(got[-1].double(), want, rtol=1e-5, atol=1e-5)
    assert min(float(t.std()) for t in got[:-1]) > 0.05  # maps that vary: a blur error would show
