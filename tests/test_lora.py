"""Stage-2 modulated LoRA: layer maths, injection counts on the full SD-Turbo layout, merge path."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from degsr.sr.config import UNET_TARGETS, VAE_TARGETS, LoraConfig
from degsr.sr.lora import (ModulatedLoRA, clear_modulation, fold, inject_modulated_lora,
                           lora_parameters, lora_targets, merged, modulated_layers, set_modulation,
                           unfold, use_modulation)
from degsr.sr.modulation import (UNET_BLOCKS, VAE_BLOCKS, DegradationModulation,
                                 unet_block_id, vae_block_id)

import diffusers  # noqa: E402

# stabilityai/sd-turbo unet/config.json and vae/config.json (the SD 2.1 layout)
SD_TURBO_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32)
SD_TURBO_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=768,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], norm_num_groups=32, scaling_factor=0.18215)

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 64],
    attention_head_dim=8, cross_attention_dim=32, use_linear_projection=True, norm_num_groups=8)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=32,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 64], norm_num_groups=8)

TINY_CFG = LoraConfig(vae_rank=4, unet_rank=8)


def _randomize_B(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in modulated_layers(model):
            w = layer.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * std)


def _trained_looking(mod: DegradationModulation) -> DegradationModulation:
    """C of a useful size that depends on d: the 1e-5 init would make some checks vacuous."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for net in (mod.vae, mod.unet):
            for lin in (net.deg_mlp[0], net.fuse):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
            net.fuse.bias.copy_(torch.randn(net.fuse.bias.shape, generator=g) * 0.3)
            # and C that depends on the block: at the 1e-5 init the block features are ~0, so
            # every block would get the same C and a mix-up of block ids would go unseen
            net.block_mlp[0].weight.copy_(torch.randn(net.block_mlp[0].weight.shape,
                                                      generator=g) * 0.3)
    return mod


def _tiny_models(seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    vae = diffusers.AutoencoderKL(**TINY_VAE).eval()
    return unet, vae


def _adapt(unet, vae, cfg=TINY_CFG):
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    lu = inject_modulated_lora(unet, cfg.unet_targets, cfg.unet_rank, cfg.alpha, unet_block_id,
                               modulated=cfg.modulated)
    lv = inject_modulated_lora(vae.encoder, cfg.vae_targets, cfg.vae_rank, cfg.alpha,
                               vae_block_id, modulated=cfg.modulated)
    return lu, lv


# ----------------------------------------------------------------------------- layer maths

def test_linear_layer_matches_explicit_per_sample_float64():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = ModulatedLoRA(base, rank=4, alpha=8.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 12)
    C = torch.randn(3, 4, 4)
    layer.C = C
    y = layer(x)

    W0, b = base.weight.double(), base.bias.double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    s = 8.0 / 4
    ref = torch.empty(3, 5, 10, dtype=torch.float64)
    for n in range(3):
        for t in range(5):
            v = x[n, t].double()
            ref[n, t] = W0 @ v + b + s * (B @ (C[n].double().T @ (A @ v)))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)

    layer.C = C[:1]                      # one C for the whole batch broadcasts
    shared = layer(x)
    layer.C = C[:1].expand(3, 4, 4)
    torch.testing.assert_close(shared, layer(x))
    layer.C = torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="C must be"):
        layer(x)
    layer.C = None
    with pytest.raises(RuntimeError, match="set_modulation"):
        layer(x)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 1), (3, 1, 1), (1, 1, 0), (4, 2, 2)])
def test_conv_layer_matches_explicit_per_sample_float64(kernel, stride, padding):
    torch.manual_seed(1)
    base = nn.Conv2d(6, 8, kernel, stride=stride, padding=padding)
    layer = ModulatedLoRA(base, rank=5, alpha=8.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 6, 9, 11)
    C = torch.randn(2, 5, 5)
    layer.C = C
    y = layer(x)

    W0, b = base.weight.double(), base.bias.double()
    A = layer.lora_A.weight.double()                     # (r, in, k, k)
    B = layer.lora_B.weight.double().reshape(8, 5)        # (out, r)
    s = 8.0 / 5
    for n in range(2):
        xn = x[n:n + 1].double()
        base_out = F.conv2d(xn, W0, b, stride=stride, padding=padding)[0]     # (out, H, W)
        a = F.conv2d(xn, A, stride=stride, padding=padding)[0]                # (r, H, W)
        h, w = a.shape[1:]
        mixed = C[n].double().T @ a.reshape(5, h * w)                         # C^T per pixel
        ref = base_out + s * (B @ mixed).reshape(8, h, w)
        torch.testing.assert_close(y[n].double(), ref, rtol=1e-5, atol=1e-5)


def test_unmodulated_layer_is_plain_lora():
    torch.manual_seed(2)
    base = nn.Linear(7, 6)
    layer = ModulatedLoRA(base, rank=3, alpha=6.0, modulated=False)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 7)
    ref = base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), ref)


def test_init_is_peft_gaussian_and_zero_B():
    torch.manual_seed(3)
    layer = ModulatedLoRA(nn.Linear(4096, 512), rank=32, alpha=8.0)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.mean().abs() < 1e-3
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 32, rel=0.02)
    assert layer.scaling == 8.0 / 32


def test_fourier_features_and_modulation_shapes():
    cfg = LoraConfig()
    mod = DegradationModulation(cfg, seed=7)
    assert "fourier.W" in mod.state_dict() and "fourier.W" not in dict(mod.named_parameters())
    assert torch.equal(mod.fourier.W, DegradationModulation(cfg, seed=7).fourier.W)
    assert not torch.equal(mod.fourier.W, DegradationModulation(cfg, seed=8).fourier.W)
    d = torch.tensor([[0.2, 0.7], [0.0, 1.0], [0.5, 0.5]])
    e = mod.fourier(d)
    W = mod.fourier.W.double()
    for n in range(3):
        pb, pn = 2 * math.pi * d[n, 0].double() * W, 2 * math.pi * d[n, 1].double() * W
        ref = torch.cat([pb.sin(), pb.cos(), pn.sin(), pn.cos()])
        torch.testing.assert_close(e[n].double(), ref, rtol=1e-5, atol=1e-5)
    Cv, Cu = mod(d)
    assert Cv.shape == (3, VAE_BLOCKS, 16, 16) and Cu.shape == (3, UNET_BLOCKS, 32, 32)
    # kaiming x 1e-5 on every MLP Linear, zero biases; embeddings keep N(0, 1)
    for net in (mod.vae, mod.unet):
        for lin in (net.deg_mlp[0], net.block_mlp[0], net.fuse):
            assert torch.count_nonzero(lin.bias) == 0
            std = 1e-5 * math.sqrt(2 / lin.in_features)
            assert lin.weight.std().item() == pytest.approx(std, rel=0.25)
        assert net.block_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.3)


def test_block_ids():
    assert vae_block_id("conv_in") == 5 and vae_block_id("encoder.conv_out") == 5
    assert vae_block_id("down_blocks.3.resnets.1.conv2") == 3
    assert vae_block_id("encoder.mid_block.attentions.0.to_q") == 4
    assert unet_block_id("down_blocks.2.downsamplers.0.conv") == 2
    assert unet_block_id("mid_block.resnets.1.conv1") == 4
    assert unet_block_id("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2") == 8
    assert unet_block_id("conv_out") == 9


def test_config_defaults_and_checks():
    cfg = LoraConfig()
    assert (cfg.vae_rank, cfg.unet_rank, cfg.alpha, cfg.fourier_dim, cfg.mlp_dim,
            cfg.block_embed_dim, cfg.modulated) == (16, 32, 8.0, 64, 256, 64, True)
    assert cfg.vae_targets == VAE_TARGETS and cfg.unet_targets == UNET_TARGETS
    assert cfg.vae_targets is not LoraConfig().vae_targets
    assert cfg.problems() == []
    bad = LoraConfig(unet_rank=0, vae_targets=[])
    assert {p.split(":")[0] for p in bad.problems()} == {"unet_rank", "vae_targets"}


# ----------------------------------------------------------------------------- whole models

def test_fresh_adapters_leave_the_model_unchanged():
    unet, vae = _tiny_models()
    base_unet, base_vae = copy.deepcopy(unet), copy.deepcopy(vae)
    _adapt(unet, vae)
    mod = DegradationModulation(TINY_CFG)
    Cv, Cu = mod(torch.tensor([[0.3, 0.8], [0.9, 0.1]]))
    torch.manual_seed(5)
    x, z, ctx = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    t = torch.tensor([999, 999])
    with torch.no_grad(), use_modulation(unet, Cu), use_modulation(vae.encoder, Cv):
        assert torch.equal(unet(z, t, ctx).sample, base_unet(z, t, ctx).sample)
        assert torch.equal(vae.encode(x).latent_dist.mean, base_vae.encode(x).latent_dist.mean)
        assert torch.equal(vae.decode(z).sample, base_vae.decode(z).sample)


def test_merged_matches_unmerged_and_restores_weights_exactly():
    unet, vae = _tiny_models(1)
    base_unet = copy.deepcopy(unet)
    _adapt(unet, vae)
    _randomize_B(unet, 1)
    _randomize_B(vae, 2)
    mod = _trained_looking(DegradationModulation(TINY_CFG))
    torch.manual_seed(6)
    x, z, ctx = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    t = torch.tensor([999, 999])
    d = torch.tensor([[0.4, 0.6]]).expand(2, 2)            # one degradation, two images
    Cv, Cu = mod(d)
    before_u = {k: v.clone() for k, v in unet.state_dict().items()}
    before_v = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        with use_modulation(unet, Cu), use_modulation(vae.encoder, Cv):
            ref_u = unet(z, t, ctx).sample
            ref_v = vae.encode(x).latent_dist.mean
        with merged(unet, Cu), merged(vae.encoder, Cv[:1]):
            assert all(layer.is_merged for _, layer in modulated_layers(unet))
            assert not torch.equal(unet.conv_out.base_layer.weight,
                                   before_u["conv_out.base_layer.weight"])
            out_u = unet(z, t, ctx).sample
            out_v = vae.encode(x).latent_dist.mean
        base_u = base_unet(z, t, ctx).sample
    # the LoRA term is not negligible next to the tolerance
    assert (ref_u - base_u).abs().max() > 1e-2
    torch.testing.assert_close(out_u, ref_u, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_v, ref_v, rtol=1e-4, atol=1e-4)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before_u[k]), k
    for k, v in vae.state_dict().items():
        assert torch.equal(v, before_v[k]), k
    assert not any(layer.is_merged for _, layer in modulated_layers(unet))

    # different degradations in one batch cannot be merged; weights stay untouched
    Cv2, Cu2 = mod(torch.tensor([[0.4, 0.6], [0.1, 0.2]]))
    with pytest.raises(ValueError, match="one degradation vector"):
        with merged(unet, Cu2):
            pass
    # an exception inside the context still restores (offloaded copies too)
    with pytest.raises(KeyError):
        with merged(unet, Cu[:1], offload=True):
            raise KeyError("boom")
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before_u[k]), k


def test_refold_recomputes_from_the_original_and_unfold_restores_it():
    """fold(C1) then fold(C2) is fold(C2) on the untouched weights (no drift however often the
    vector changes); both match W0 + s (B C^T) A in float64; unfold gives W0 back bit-exactly."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(5, 7, 3, padding=1), nn.Linear(8, 6))
    inject_modulated_lora(net, ["0", "1"], rank=3, alpha=6.0)
    _randomize_B(net, 5, std=0.3)
    w0 = [net[i].base_layer.weight.detach().clone() for i in (0, 1)]
    C1, C2 = {0: torch.randn(1, 3, 3)}, {0: torch.randn(1, 3, 3)}
    fold(net, C2)
    once = [net[i].base_layer.weight.detach().clone() for i in (0, 1)]
    unfold(net)
    for _ in range(3):
        fold(net, C1)
        fold(net, C2)
    for i in (0, 1):
        layer = net[i]
        assert torch.equal(layer.base_layer.weight, once[i])
        A = layer.lora_A.weight.double().reshape(3, -1)
        B = layer.lora_B.weight.double().reshape(-1, 3)
        ref = w0[i].double() + (2.0 * B @ C2[0][0].double().T @ A).reshape(w0[i].shape)
        torch.testing.assert_close(layer.base_layer.weight.double(), ref, rtol=1e-6, atol=1e-6)
        assert layer.is_merged
    unfold(net)
    for i in (0, 1):
        assert torch.equal(net[i].base_layer.weight, w0[i])
        assert not net[i].is_merged and net[i].pristine is None


def test_merged_conv_fold_is_exact_for_strided_padded_conv():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(5, 7, 3, stride=2, padding=1), nn.ReLU(), nn.Linear(4, 3))
    inject_modulated_lora(net, ["0", "2"], rank=3, alpha=8.0)
    _randomize_B(net, 3, std=0.3)
    C = {0: torch.randn(1, 3, 3)}
    x = torch.randn(2, 5, 8, 8)
    with torch.no_grad(), use_modulation(net, C):
        ref = net(x)
    with torch.no_grad(), merged(net, C):
        out = net(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_full_sd_turbo_counts_on_meta_device():
    cfg = LoraConfig()
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD_TURBO_UNET)
        vae = diffusers.AutoencoderKL(**SD_TURBO_VAE)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863

    # the names agree with peft's own matching rule (the reference's tool)
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    vae_names = lora_targets(vae.encoder, cfg.vae_targets)
    unet_names = lora_targets(unet, cfg.unet_targets)
    for net, names, targets in ((vae.encoder, vae_names, cfg.vae_targets),
                                (unet, unet_names, cfg.unet_targets)):
        pc = PeftLoraConfig(r=8, target_modules=list(targets))
        assert names == [n for n, _ in net.named_modules()
                         if n and check_target_module_exists(pc, n)]
    # the reference's regex on the whole VAE picks the same encoder layers
    regex = (r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v"
             r"|to_out\.0)$")
    assert lora_targets(vae, regex) == ["encoder." + n for n in vae_names]
    assert len(vae_names) == 31, vae_names
    assert len(unet_names) == 257

    unet.requires_grad_(False)
    vae.requires_grad_(False)
    lv = inject_modulated_lora(vae.encoder, cfg.vae_targets, cfg.vae_rank, cfg.alpha, vae_block_id)
    lu = inject_modulated_lora(unet, cfg.unet_targets, cfg.unet_rank, cfg.alpha, unet_block_id)
    assert [n for n, _ in lv] == vae_names and [n for n, _ in lu] == unet_names
    assert sorted({layer.block_id for _, layer in lv}) == list(range(VAE_BLOCKS))
    assert sorted({layer.block_id for _, layer in lu}) == list(range(UNET_BLOCKS))
    assert lora_targets(unet, cfg.unet_targets) == []          # already adapted: nothing new
    unet.conv_in.requires_grad_(True)
    mod = DegradationModulation(cfg)

    # independent count of the LoRA weights: r * (fan_in + out) per layer, from the base shapes
    def lora_count(layers, r):
        total = 0
        for _, layer in layers:
            w = layer.base_layer.weight
            total += r * (w[0].numel() + w.shape[0])
        return total

    n_vae, n_unet = lora_count(lv, 16), lora_count(lu, 32)
    n_conv_in = 320 * 4 * 9 + 320
    n_mod = sum(p.numel() for p in mod.parameters())
    expected = n_vae + n_unet + n_conv_in + n_mod
    trainable = (sum(p.numel() for p in vae.parameters() if p.requires_grad)
                 + sum(p.numel() for p in unet.parameters() if p.requires_grad)
                 + sum(p.numel() for p in mod.parameters() if p.requires_grad))
    breakdown = (f"VAE LoRA {n_vae:,} + UNet LoRA {n_unet:,} + UNet conv_in {n_conv_in:,} + "
                 f"modulation {n_mod:,} = {expected:,} (trainable {trainable:,})")
    assert trainable == expected, breakdown
    assert sum(p.numel() for p in lora_parameters(vae)) == n_vae, breakdown
    assert abs(trainable - 34.5e6) / 34.5e6 < 0.03, breakdown
    # modulation: 2 x (256*256+256) + 6*64 + 10*64 + 2 x (64*64+64) + 320*257 + 320*1025
    assert n_mod == 2 * 65_792 + 1_024 + 2 * 4_160 + 82_176 + 328_704, breakdown


def test_tiny_forward_per_sample_modulation_and_gradients():
    unet, vae = _tiny_models(2)
    lu, lv = _adapt(unet, vae)
    unet.conv_in.requires_grad_(True)
    _randomize_B(unet, 4)           # a trained-looking B, so that A and the MLPs get gradients
    _randomize_B(vae, 5)
    mod = DegradationModulation(TINY_CFG)
    d = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    torch.manual_seed(7)
    x, ctx = torch.randn(2, 3, 32, 32), torch.randn(2, 7, 32)
    t = torch.tensor([999, 999])

    Cv, Cu = mod(d)
    set_modulation(vae.encoder, Cv)
    set_modulation(unet, Cu)
    z = vae.encode(x).latent_dist.mean
    out = unet(z, t, ctx).sample
    out.square().mean().backward()
    clear_modulation(vae.encoder)
    clear_modulation(unet)

    trainable = ([p for p in mod.parameters()] + list(lora_parameters(unet))
                 + list(lora_parameters(vae)) + list(unet.conv_in.parameters()))
    ids = {id(p) for p in trainable}
    for p in trainable:
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0
    for name, p in list(unet.named_parameters()) + list(vae.named_parameters()):
        if id(p) not in ids:
            assert not p.requires_grad and p.grad is None, name
    assert mod.fourier.W.grad is None

    # per sample: each image's output only depends on its own d
    _trained_looking(mod)
    with torch.no_grad():
        Cv, Cu = mod(d)
        with use_modulation(vae.encoder, Cv), use_modulation(unet, Cu):
            out = unet(vae.encode(x).latent_dist.mean, t, ctx).sample
        for n in range(2):
            Cv1, Cu1 = mod(d[n:n + 1])
            with use_modulation(vae.encoder, Cv1), use_modulation(unet, Cu1):
                single = unet(vae.encode(x[n:n + 1]).latent_dist.mean, t[:1], ctx[n:n + 1]).sample
            torch.testing.assert_close(single[0], out[n].detach(), rtol=1e-4, atol=1e-5)
        with use_modulation(vae.encoder, Cv.flip(0)), use_modulation(unet, Cu.flip(0)):
            swapped = unet(vae.encode(x).latent_dist.mean, t, ctx).sample
        assert not torch.allclose(swapped, out.detach(), rtol=1e-4, atol=1e-5)


def test_plain_lora_ablation_needs_no_modulation():
    cfg = LoraConfig(vae_rank=4, unet_rank=8, modulated=False)
    unet, vae = _tiny_models(3)
    _adapt(unet, vae, cfg)
    _randomize_B(unet, 6)
    z, ctx, t = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32), torch.tensor([999])
    with torch.no_grad():
        ref = unet(z, t, ctx).sample
        with merged(unet):
            torch.testing.assert_close(unet(z, t, ctx).sample, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- review additions

def test_modulation_C_matches_the_mlps_written_out_in_float64():
    """C[n, k] from the weights by hand: e = [sin, cos](2 pi d_blur W), [sin, cos](2 pi d_noise W);
    h = ReLU(W1 e + b1); blk = ReLU(Wb emb_k + bb); C = (Wf [h, blk] + bf) read row-major as
    r x r (the reference's ``de_mod`` layout: the layer computes a @ C on row vectors)."""
    mod = DegradationModulation(TINY_CFG, seed=4)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():  # every Linear of a useful size, so that each ReLU clips something
        for lin in (m for m in mod.modules() if isinstance(m, nn.Linear)):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.2)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.2)
    d = torch.tensor([[0.2, 0.7], [0.9, 0.05]])
    Cv, Cu = mod(d)
    W = mod.fourier.W.double()
    dd = lambda t: t.detach().double()  # noqa: E731
    for net, C, r, blocks in ((mod.vae, Cv, TINY_CFG.vae_rank, VAE_BLOCKS),
                              (mod.unet, Cu, TINY_CFG.unet_rank, UNET_BLOCKS)):
        assert C.shape == (2, blocks, r, r)
        for n in range(2):
            pb, pn = 2 * math.pi * float(d[n, 0]) * W, 2 * math.pi * float(d[n, 1]) * W
            e = torch.cat([pb.sin(), pb.cos(), pn.sin(), pn.cos()])
            h = torch.clamp(dd(net.deg_mlp[0].weight) @ e + dd(net.deg_mlp[0].bias), min=0)
            for k in range(blocks):
                emb = dd(net.block_embeddings.weight[k])
                blk = torch.clamp(dd(net.block_mlp[0].weight) @ emb + dd(net.block_mlp[0].bias),
                                  min=0)
                c = dd(net.fuse.weight) @ torch.cat([h, blk]) + dd(net.fuse.bias)
                want = torch.tensor([[float(c[i * r + j]) for j in range(r)] for i in range(r)],
                                    dtype=torch.float64)
                torch.testing.assert_close(C[n, k].double(), want, rtol=1e-5, atol=1e-5)


def test_each_layer_reads_the_C_of_its_own_block_id():
    """set_modulation with a (B, blocks, r, r) tensor: a layer of block k computes
    W0 x + s B (C[:, k]^T (A x)) (float64, per sample), for k at both ends of the range."""
    torch.manual_seed(13)
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(6, 4), nn.Linear(6, 3))
    ids = {"0": 0, "1": 3, "2": 5}
    inject_modulated_lora(net, ["0", "1", "2"], rank=3, alpha=6.0, block_id_fn=ids.__getitem__)
    _randomize_B(net, 8, std=0.5)
    C = torch.randn(2, 6, 3, 3)
    x = torch.randn(2, 6)
    with torch.no_grad(), use_modulation(net, C):
        outs = [net[i](x) for i in range(3)]
    for i in range(3):
        layer, k = net[i], ids[str(i)]
        W0, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
        A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
        for n in range(2):
            v = x[n].double()
            want = W0 @ v + b + 2.0 * (B @ (C[n, k].double().T @ (A @ v)))
            torch.testing.assert_close(outs[i][n].double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="block id 5"):  # a mapping lacking a block says which
        set_modulation(net, {0: C[:, 0], 3: C[:, 3]})


def test_target_matching_follows_peft_for_other_target_lists():
    """The '.suffix' rule on target lists that are not the defaults (a bare 'endswith' would
    also adapt to_q for 'q', time_emb_proj for 'proj', conv2 for '2'), against peft's own check."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    unet, _ = _tiny_models()
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for targets in (["q", "k"], ["proj", "conv"], ["2", "out.0"]):
        pc = PeftLoraConfig(r=4, target_modules=list(targets))
        want = [n for n in names if check_target_module_exists(pc, n)]
        assert lora_targets(unet, targets) == want, targets
    assert lora_targets(unet, ["q"]) == []  # no module is named 'q' or ends in '.q'


def test_fold_gives_each_layer_the_C_of_its_own_block():
    """fold with a (1, blocks, r, r) tensor: layer k's weight is W0 + s B C[0, k]^T A (float64),
    for layers of different blocks folded in one call (C^T is computed once per block)."""
    torch.manual_seed(14)
    net = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(4, 3, 3, padding=1), nn.Linear(6, 4))
    ids = {"0": 0, "1": 2, "2": 5}
    inject_modulated_lora(net, ["0", "1", "2"], rank=3, alpha=6.0, block_id_fn=ids.__getitem__)
    _randomize_B(net, 9, std=0.5)
    w0 = {i: net[i].base_layer.weight.detach().double().clone() for i in range(3)}
    C = torch.randn(1, 6, 3, 3)
    fold(net, C)
    for i in range(3):
        layer, k = net[i], ids[str(i)]
        A = layer.lora_A.weight.double().reshape(3, -1)
        B = layer.lora_B.weight.double().reshape(-1, 3)
        want = w0[i] + (2.0 * B @ C[0, k].double().T @ A).reshape(w0[i].shape)
        torch.testing.assert_close(layer.base_layer.weight.double(), want, rtol=1e-6, atol=1e-6)
    unfold(net)


@pytest.mark.parametrize("dilation,padding_mode", [(2, "zeros"), (1, "reflect"), (2, "circular")])
def test_conv_adapter_keeps_the_base_dilation_and_padding_mode(dilation, padding_mode):
    """A sees what the base kernel sees: same dilation, same padding mode (float64 by hand), and
    the folded kernel gives the same output."""
    torch.manual_seed(15)
    base = nn.Conv2d(4, 6, 3, padding=2, dilation=dilation, padding_mode=padding_mode)
    layer = ModulatedLoRA(base, rank=3, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, 9, 10)
    C = torch.randn(2, 3, 3)
    layer.C = C
    y = layer(x)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    xp = F.pad(x.double(), (2, 2, 2, 2), mode=mode)
    W0, b = base.weight.double(), base.bias.double()
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double().reshape(6, 3)
    for n in range(2):
        base_out = F.conv2d(xp[n:n + 1], W0, b, dilation=dilation)[0]
        a = F.conv2d(xp[n:n + 1], A, dilation=dilation)[0]
        h, w = a.shape[1:]
        ref = base_out + 2.0 * (B @ (C[n].double().T @ a.reshape(3, h * w))).reshape(6, h, w)
        torch.testing.assert_close(y[n].double(), ref, rtol=1e-5, atol=1e-5)
    net = nn.Sequential(layer)
    with torch.no_grad(), merged(net, {0: C[:1]}):
        folded = net(x[:1])
    torch.testing.assert_close(folded, y[:1].detach(), rtol=1e-5, atol=1e-5)


def test_a_2d_C_is_the_same_matrix_for_every_sample():
    """A (r, r) C is one C for the batch, not its transpose: W0 x + s B (C^T (A x))."""
    torch.manual_seed(16)
    base = nn.Linear(5, 4)
    layer = ModulatedLoRA(base, rank=3, alpha=3.0)
    nn.init.normal_(layer.lora_B.weight)
    x, C = torch.randn(2, 5), torch.randn(3, 3)
    layer.C = C
    y = layer(x)
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    for n in range(2):
        v = x[n].double()
        want = base.weight.double() @ v + base.bias.double() + B @ (C.double().T @ (A @ v))
        torch.testing.assert_close(y[n].double(), want, rtol=1e-5, atol=1e-6)


def test_injection_freezes_the_base_and_trains_float32_adapters_on_a_half_base():
    """inject_modulated_lora freezes the adapted base layers itself (whatever requires_grad they
    had) and leaves other modules alone; on a bfloat16 base the adapters are float32 (as peft),
    the output keeps the base dtype and is the float64 formula to bf16 accuracy."""
    torch.manual_seed(17)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))
    inject_modulated_lora(net, ["0"], rank=4, alpha=8.0)
    assert not any(p.requires_grad for p in net[0].base_layer.parameters())
    assert all(p.requires_grad for p in net[0].lora_A.parameters())
    assert all(p.requires_grad for p in net[0].lora_B.parameters())
    assert all(p.requires_grad for p in net[1].parameters())      # not a target: untouched

    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = ModulatedLoRA(base, rank=4, alpha=8.0)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    nn.init.normal_(layer.lora_B.weight)
    x, C = torch.randn(3, 16).to(torch.bfloat16), torch.randn(3, 4, 4)
    layer.C = C
    y = layer(x)
    assert y.dtype == torch.bfloat16
    A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    for n in range(3):
        v = x[n].double()
        want = (base.weight.double() @ v + base.bias.double()
                + 2.0 * (B @ (C[n].double().T @ (A @ v))))
        torch.testing.assert_close(y[n].double(), want, rtol=2e-2, atol=2e-2)
    assert layer(x).dtype == torch.bfloat16
