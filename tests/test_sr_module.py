"""Stage 2 module: no GAN leak, training reduces the loss, adapter round trip, degsr fit."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from degsr.config import load_config
from degsr.degradation.pipeline import Degrader
from degsr.sr.model import load_adapter, save_adapter
from degsr.sr.module import SRModule

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/sr_tiny.yaml"


def module(*overrides):
    cfg = load_config([TINY], list(overrides))
    torch.manual_seed(0)
    return SRModule(cfg.model, cfg.lora, cfg.disc, cfg.sr, cfg.degradation, seed=0), cfg


def batch(cfg, n=2, size=64):
    from degsr.data.photos import load_photo
    img = torch.from_numpy(load_photo("astronaut")).permute(2, 0, 1).float() / 255
    hr = torch.stack([img[:, 100 + 40 * i:100 + 40 * i + size, 200:200 + size] for i in range(n)])
    return Degrader(cfg.degradation)(hr, torch.Generator().manual_seed(0))


def force_negatives(monkeypatch, marks):
    """online_negatives marking exactly ``marks`` (their target: their own upsampled LR)."""
    neg = torch.tensor(marks)
    monkeypatch.setattr("degsr.sr.module.online_negatives", lambda x, g, p: {
        **x, "negative": neg, "target": torch.where(neg.view(-1, 1, 1, 1), x["lr_up"], x["gt"])})
    return neg


def test_generator_step_puts_no_gradient_into_the_discriminator():
    m, cfg = module("sr.neg_prob=0")
    loss, terms, _ = m.generator_loss(batch(cfg), torch.Generator().manual_seed(0))
    assert "gan_g" in terms
    loss.backward()
    assert all(p.grad is None for p in m.disc.head_parameters())
    assert all(p.requires_grad for p in m.disc.head_parameters())  # restored after the G step
    lora = [p for n, p in m.net.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None for p in lora)
    assert all(p.grad is None for p in m.disc.backbone.parameters())


def test_negatives_use_negative_prompt_and_own_lr_target():
    m, cfg = module("sr.neg_prob=1", "sr.gan_weight=0")
    _, terms, out = m.generator_loss(batch(cfg), torch.Generator().manual_seed(0))
    assert out["negative"].all() and torch.equal(out["target"], out["lr_up"])
    assert set(terms) == {"mse"}


def test_gan_terms_judge_every_sample_under_the_positive_prompt(monkeypatch):
    """METHOD.md: the GAN term uses the positive prompt for all. Sample 1 takes the negative
    prompt for the reconstruction; the GAN sees its output under the positive prompt, made as
    one more row of the same call."""
    m, cfg = module("sr.neg_prob=0")
    b = batch(cfg, n=3)
    force_negatives(monkeypatch, [False, True, False])
    calls, judged, recon = [], [], []
    forward, loss_g, losses = m.net.forward, m.disc.loss_g, m.reconstruction_losses

    def spy(lr_up, d, **kw):
        out = forward(lr_up, d, **kw)
        calls.append((lr_up, d, kw.get("negative"), out))
        return out

    monkeypatch.setattr(m.net, "forward", spy)
    monkeypatch.setattr(m.disc, "loss_g", lambda fake, generator=None: judged.append(fake) or
                        loss_g(fake, generator))
    monkeypatch.setattr(m, "reconstruction_losses", lambda sr, t: recon.append(sr) or losses(sr, t))
    loss, terms, out = m.generator_loss(b, torch.Generator().manual_seed(0))
    (x, d, negative, y), = calls  # one call: rows 0-2 the batch, row 3 sample 1 again
    torch.testing.assert_close(x, torch.cat([b["lr_up"], b["lr_up"][1:2]]) * 2 - 1, rtol=0, atol=0)
    assert torch.equal(d[3], d[1]) and negative.tolist() == [False, True, False, False]
    fake, sr = judged[0], out["sr"]
    assert torch.equal(recon[0], y[:3]) and torch.equal(sr, y[:3])
    assert torch.equal(fake[[0, 2]], y[[0, 2]]) and torch.equal(fake[1], y[3])
    assert not torch.equal(fake[1], sr[1])  # the negative prompt gave another output
    assert out["fake"] is fake  # the discriminator's fakes (training_step) are the same
    loss.backward()
    assert all(p.grad is None for p in m.disc.head_parameters())


def test_a_few_steps_on_a_fixed_batch_reduce_the_reconstruction_loss():
    m, cfg = module("sr.gan_weight=0", "sr.neg_prob=0", "sr.lr=1e-3")
    b = batch(cfg)
    opt = torch.optim.AdamW(m.net.trainable_parameters(), lr=1e-3)

    def loss():
        return m.generator_loss(b, torch.Generator().manual_seed(0))[0]

    first = loss().item()
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.9 * first


def test_fresh_adapter_is_the_base_model_and_export_load_is_identical(tmp_path):
    from degsr.sr.components import load_components
    from degsr.sr.onestep import one_step_sr

    m, cfg = module()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    d = torch.tensor([[0.2, 0.7], [0.9, 0.1]])
    base = load_components(cfg.model)
    with torch.no_grad():
        ref = one_step_sr(base, x, generator=torch.Generator().manual_seed(1))
        ours = m.net(x, d, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # B = 0: LoRA adds nothing yet
    with torch.no_grad():  # give the adapter something to carry
        for p in m.net.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
        before = m.net(x, d, generator=torch.Generator().manual_seed(1))
    save_adapter(m.net, tmp_path / "adapter", extra={"scale": 4})
    net, meta = load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        after = net(x, d, generator=torch.Generator().manual_seed(1))
    assert meta["scale"] == 4 and not torch.allclose(before, ref)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    size = (tmp_path / "adapter/adapter.safetensors").stat().st_size
    assert size < 4 * sum(p.numel() for p in m.net.trainable_parameters()) + 200_000


def test_adapter_errors_name_the_file(tmp_path):
    from degsr.errors import UserError
    with pytest.raises(UserError, match="not an adapter export"):
        load_adapter(tmp_path)
    (tmp_path / "adapter.json").write_text('{"format": "other"}')
    (tmp_path / "adapter.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="adapter.json"):
        load_adapter(tmp_path)


def test_an_adapter_on_another_base_names_the_base_it_was_trained_on(tmp_path):
    """A base whose layers have other shapes: the error names the adapter's own base folder."""
    from degsr.errors import UserError
    from degsr.sr.config import LoraConfig, ModelConfig
    from degsr.sr.model import SRModel
    from degsr.sr.tiny_folder import save_tiny_pretrained

    ours = save_tiny_pretrained(tmp_path / "ours")
    other = save_tiny_pretrained(tmp_path / "other", unet={"block_out_channels": [32, 32, 64, 96]})
    net = SRModel(ModelConfig(pretrained=str(ours)), LoraConfig())
    save_adapter(net, tmp_path / "adapter", extra={"scale": 4, "base": "ours"})
    with pytest.raises(UserError, match=r"match the base model .*; it was trained on the base "
                                        rf"folder 'ours', this is {other}$"):
        load_adapter(tmp_path / "adapter", str(other))


def test_adapter_json_is_checked_and_a_loaded_net_saves_the_same_adapter(tmp_path, monkeypatch):
    """A malformed adapter.json is one line naming it (they were KeyError / TypeError); an
    adapter trained on a base folder refuses to load without one (it ran on random weights);
    ~ is expanded; a loaded (frozen) net saves every adapter tensor again (it saved one)."""
    import json

    from degsr.errors import UserError
    from degsr.sr.tiny_folder import save_tiny_pretrained

    m, _ = module()
    save_adapter(m.net, tmp_path / "a")
    good = json.loads((tmp_path / "a" / "adapter.json").read_text())
    net, _ = load_adapter(tmp_path / "a")
    save_adapter(net, tmp_path / "again")
    assert (tmp_path / "again" / "adapter.safetensors").read_bytes() == \
        (tmp_path / "a" / "adapter.safetensors").read_bytes()
    half, _ = load_adapter(tmp_path / "a", dtype=torch.bfloat16)  # vae.dtype is a LoRA tensor's
    with torch.no_grad():
        assert half(torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([[0.3, 0.6]])).isfinite().all()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_adapter("~/a")[1]["format"] == good["format"]
    for edit, words in [(lambda j: j.pop("model"), "'model' is not a valid ModelConfig"),
                        (lambda j: j["lora"].update(extra_key=1), "'lora' is not a valid"),
                        (lambda j: j["lora"].update(vae_rank=0), "lora.vae_rank"),
                        (lambda j: j.update(format_version=2), "format_version 2")]:
        meta = json.loads(json.dumps(good))
        edit(meta)
        (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta))
        with pytest.raises(UserError, match=words) as err:
            load_adapter(tmp_path / "a")
        assert str(err.value).startswith(str(tmp_path / "a" / "adapter.json"))
    (tmp_path / "a" / "adapter.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="format is 'list'"):
        load_adapter(tmp_path / "a")
    base = save_tiny_pretrained(tmp_path / "mybase", seed=0)
    from degsr.sr.config import LoraConfig, ModelConfig
    from degsr.sr.model import SRModel
    save_adapter(SRModel(ModelConfig(pretrained=str(base)), LoraConfig()), tmp_path / "b")
    with pytest.raises(UserError, match="trained on the base folder 'mybase'"):
        load_adapter(tmp_path / "b")
    assert load_adapter(tmp_path / "b", pretrained=str(base))[1]["base"] == "mybase"
    # the random base's keys are recorded only for an adapter trained on one
    on_folder = json.loads((tmp_path / "b" / "adapter.json").read_text())["model"]
    assert "arch" not in on_folder and "seed" not in on_folder
    assert good["model"]["arch"] == "tiny" and good["base"] is None


def test_degsr_fit_sr_on_a_saved_tiny_folder_with_all_losses_and_resume(tmp_path, degsr_cmd):
    """The real loading paths: a diffusers folder, a stage-1 export, torchvision-format VGG16
    weights for LPIPS, a local ViT folder for the critic; then resume from last.ckpt."""
    from degsr.data.photos import write_photos
    from degsr.estimator.config import tiny_net
    from degsr.estimator.export import save_estimator
    from degsr.estimator.network import DegradationEstimator
    from degsr.metrics.lpips import VGG16Features
    from degsr.sr.tiny_folder import save_tiny_pretrained
    from degsr.sr.discriminator import save_tiny_backbone

    save_tiny_pretrained(tmp_path / "base")
    save_estimator(DegradationEstimator(tiny_net()), tmp_path / "est")
    torch.save(VGG16Features().state_dict(), tmp_path / "vgg16.pth")
    save_tiny_backbone(tmp_path / "vit")
    write_photos(tmp_path / "train", ("astronaut", "coins"))
    write_photos(tmp_path / "val", ("chelsea",))
    subprocess.run([*degsr_cmd, "shards", str(tmp_path / "train"), "--out", str(tmp_path / "sh"),
                    "--min-side", "64", "--min-bytes", "0"], check=True, capture_output=True)
    common = [str(TINY), f"model.pretrained={tmp_path}/base", "sr.estimator=est",  # relative
              f"sr.lpips_vgg={tmp_path}/vgg16.pth", "sr.lpips_weight=5", f"disc.backbone={tmp_path}/vit",
              f"data.train_shards={tmp_path}/sh", f"data.val_folder={tmp_path}/val", f"run.dir={tmp_path}/runs",
              "data.batch_size=2", "data.num_workers=0", "data.val_crops=2", "data.val_batch_size=2",
              "trainer.val_every_n_steps=2", "trainer.checkpoint_every_n_steps=2", "sr.neg_prob=0.5"]
    r = subprocess.run([*degsr_cmd, "fit", *common, "trainer.max_steps=2"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    run = Path(out["run_dir"])
    assert out["global_step"] == 2 and "val/psnr_y" in out["metrics"] and "val/lpips" in out["metrics"]
    assert 0 <= out["metrics"]["train/d_real"] <= 1 and 0 <= out["metrics"]["train/d_fake"] <= 1
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert not any(".backbone." in k or "base_layer" in k for k in ckpt["state_dict"])  # trainable only
    assert any(k.startswith("disc.heads.") for k in ckpt["state_dict"])
    net, meta = load_adapter(run / "export", pretrained=str(tmp_path / "base"))
    assert meta["scale"] == 4 and meta["estimator"] == str((tmp_path / "est").resolve())  # absolute
    r2 = subprocess.run([*degsr_cmd, "fit", *common, "trainer.max_steps=3"], capture_output=True, text=True,
                        cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads(r2.stdout.strip().splitlines()[-1])["global_step"] == 3


def _saved_bytes_and_grads(m, b):
    """Bytes autograd keeps for backward (parameters excluded), and every trainable gradient."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    sizes: dict[int, int] = {}  # storage -> bytes (a tensor saved twice counts once)

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m.generator_loss(b, torch.Generator().manual_seed(0))[0]
    loss.backward()
    return sum(sizes.values()), [p.grad.clone() for p in m.net.trainable_parameters()]


def test_checkpointing_the_vae_decoder_keeps_less_and_changes_no_gradient():
    """sr.gradient_checkpointing=[vae_decoder]: only the decoder recomputes; the gradients are
    those of the plain backward (float32 rounding), and autograd keeps fewer bytes."""
    comp, (kept_plain, _), (kept_ckpt, _) = _plain_vs_checkpointed(
        ["sr.gan_weight=0", "sr.neg_prob=0"], "vae_decoder")
    assert comp.vae.decoder.gradient_checkpointing and not comp.vae.encoder.gradient_checkpointing
    assert not comp.unet.is_gradient_checkpointing
    assert kept_ckpt < 0.8 * kept_plain


def _plain_vs_checkpointed(overrides, parts):
    """The same non-zero adapter (every LoRA factor gets a gradient) without and with
    ``sr.gradient_checkpointing=[parts]``: the gradients must agree (float32 rounding); returns
    the checkpointed components and (saved bytes, gradients) of both."""
    plain, cfg = module(*overrides)
    ckpt, _ = module(*overrides, f"sr.gradient_checkpointing=[{parts}]")
    with torch.no_grad():
        for p, q in zip(plain.net.trainable_parameters(), ckpt.net.trainable_parameters()):
            q.copy_(p.add_(torch.randn_like(p) * 1e-2))
    plain.train(), ckpt.train()
    b = batch(cfg)
    a, c = _saved_bytes_and_grads(plain, b), _saved_bytes_and_grads(ckpt, b)
    for x, y in zip(a[1], c[1]):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
    return ckpt.net.comp, a, c


def test_checkpointed_unet_with_negatives_and_gan_changes_no_gradient(monkeypatch):
    """The negatives' positive-prompt rows run in the same call as the batch: a checkpointed
    UNet/encoder recomputes with that call's modulation, so the gradients are the plain ones."""
    force_negatives(monkeypatch, [False, True])
    comp, _, _ = _plain_vs_checkpointed([], "unet,vae_encoder")
    assert comp.unet.is_gradient_checkpointing


def test_both_optimizer_steps_are_clipped_to_grad_clip(monkeypatch):
    """sr.grad_clip bounds the gradient each optimizer steps with, the discriminator's too (the
    reference clips both); the norms are recomputed here in float64, one tensor at a time."""
    import lightning as L

    clip = 1e-4
    m, cfg = module(f"sr.grad_clip={clip}", "sr.neg_prob=0")
    seen, configure = {}, m.configure_optimizers

    def norm(params):
        return sum(p.grad.double().pow(2).sum() for p in params if p.grad is not None) ** 0.5

    def spied():
        opt_g, opt_d = configure()
        for name, opt in (("g", opt_g), ("d", opt_d)):
            params = [p for group in opt.param_groups for p in group["params"]]
            step = opt.step
            opt.step = lambda *a, _s=step, _n=name, _p=params, **k: (
                seen.__setitem__(_n, norm(_p).item()), _s(*a, **k))[1]
        return opt_g, opt_d

    monkeypatch.setattr(m, "configure_optimizers", spied)
    logged = {}
    monkeypatch.setattr(m, "log_dict", lambda d, **k: logged.update(d))
    b = batch(cfg)
    loader = torch.utils.data.DataLoader([b], batch_size=None)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0
              ).fit(m, loader)
    assert set(seen) == {"g", "d"}
    assert logged["train/grad_norm"] > 10 * clip and logged["train/grad_norm_d"] > 10 * clip
    assert seen["g"] == pytest.approx(clip, rel=1e-4) and seen["d"] == pytest.approx(clip, rel=1e-4)


@torch.no_grad()
def test_cfg_forward_of_a_batch_is_each_sample_alone_and_uses_the_posterior_mean():
    """SRModel with CFG and the posterior mean (validation's call): a batch of two degradation
    vectors gives what each sample gives alone (the negative half of the batched UNet call must
    carry each sample's own C), and equals the one-step formula written out on the networks:
    z = mean * sf, eps = eps_neg + g (eps_pos - eps_neg), x0, decode, clamp."""
    import math

    from degsr.sr.config import LoraConfig, ModelConfig
    from degsr.sr.model import SRModel

    torch.manual_seed(0)
    net = SRModel(ModelConfig(arch="tiny"), LoraConfig(vae_rank=4, unet_rank=8)).eval()
    g = torch.Generator().manual_seed(3)
    for n, p in net.named_parameters():  # a trained-looking adapter: C depends a lot on d
        if "lora_B" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        elif n.startswith("modulation.") and "embeddings" not in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    d = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    scale = 3.0
    batched = net(x, d, guidance_scale=scale, posterior_mean=True)
    comp = net.comp  # the modulation of the batched call is still set: the formula by hand
    sf, ab = comp.scaling_factor, comp.alpha_bar_t
    z = comp.vae.encode(x).latent_dist.mean * sf
    emb = torch.cat([comp.pos_embeds.expand(2, -1, -1), comp.neg_embeds.expand(2, -1, -1)])
    eps_pos, eps_neg = comp.unet(torch.cat([z, z]), torch.full((4,), 999), emb).sample.chunk(2)
    eps = eps_neg + scale * (eps_pos - eps_neg)
    x0 = (z.double() - math.sqrt(1 - ab) * eps.double()) / math.sqrt(ab)
    want = comp.vae.decode((x0 / sf).float()).sample.clamp(-1, 1)
    torch.testing.assert_close(batched, want, rtol=0, atol=1e-5)
    for i in range(2):
        alone = net(x[i:i + 1], d[i:i + 1], guidance_scale=scale, posterior_mean=True)
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=0, atol=1e-4)
    # the two vectors really modulate differently (else the per-sample check is vacuous)
    swapped = net(x, d.flip(0), guidance_scale=scale, posterior_mean=True)
    assert (swapped - batched).abs().max() > 1e-3


def test_online_negatives_are_reconstructed_toward_their_own_lr(monkeypatch):
    """The MSE term, by hand: sample 0 (negative prompt) against its own upsampled LR, sample 1
    against its ground truth, both mapped to [-1, 1]; float64 mean over all pixels."""
    m, cfg = module("sr.neg_prob=0", "sr.gan_weight=0")
    b = batch(cfg)
    force_negatives(monkeypatch, [True, False])
    _, terms, out = m.generator_loss(b, torch.Generator().manual_seed(0))
    sr = out["sr"].detach().double()
    want = torch.stack([b["lr_up"][0], b["gt"][1]]).double() * 2 - 1
    assert not torch.equal(b["lr_up"][0], b["gt"][0])
    torch.testing.assert_close(terms["mse"].double(), ((sr - want) ** 2).mean(), rtol=1e-6,
                               atol=0)


def test_training_step_gives_the_discriminator_gt_as_real_and_weights_it(monkeypatch):
    """training_step's D step: real = the batch's ground truth in [-1, 1], fake = the generator's
    output of the same step (detached), and the loss back-propagated is gan_weight x loss_d
    (/ accumulate, here 2: both backward passes are divided by it)."""
    m, cfg = module("sr.neg_prob=0", "sr.accumulate=2")
    b = batch(cfg)
    outputs, seen, backward, g_losses = [], {}, [], []
    forward, loss_d, gen_loss = m.net.forward, m.disc.loss_d, m.generator_loss

    def spy_generator_loss(*a, **kw):
        g_losses.append(gen_loss(*a, **kw))
        return g_losses[-1]

    def spy_forward(*a, **kw):
        outputs.append(forward(*a, **kw))
        return outputs[-1]

    def spy_loss_d(real, fake, generator=None):
        seen.update(real=real, fake=fake, value=loss_d(real, fake, generator))
        return seen["value"]

    class Opt:
        def __init__(self):
            self.optimizer = self

        def zero_grad(self, set_to_none=True):
            pass

        def step(self):
            pass

    monkeypatch.setattr(m.net, "forward", spy_forward)
    monkeypatch.setattr(m.disc, "loss_d", spy_loss_d)
    monkeypatch.setattr(m, "generator_loss", spy_generator_loss)
    monkeypatch.setattr(m, "manual_backward", lambda loss: backward.append(loss.detach()))
    monkeypatch.setattr(m, "_optimizers", lambda: (Opt(), Opt()))
    m.training_step(b, 0)
    (out,) = outputs
    torch.testing.assert_close(seen["real"], b["gt"] * 2 - 1, rtol=0, atol=0)
    assert torch.equal(seen["fake"], out.detach()) and not seen["fake"].requires_grad
    assert len(backward) == 2  # the generator's loss, then the discriminator's
    assert cfg.sr.accumulate == 2 and cfg.sr.gan_weight != 1
    torch.testing.assert_close(backward[0], g_losses[0][0].detach() / 2, rtol=1e-6, atol=0)
    want = cfg.sr.gan_weight * seen["value"].detach() / 2
    torch.testing.assert_close(backward[1], want, rtol=1e-6, atol=0)


def test_generator_loss_is_2_mse_plus_5_lpips_plus_half_gan(tmp_path):
    """METHOD.md's weights: the defaults are 2.0 / 5.0 / 0.5, and the generator's loss is that
    weighted sum, with the MSE recomputed here in float64 from the output and the target, and
    LPIPS by the (reference-tested) metric on the same pair."""
    from degsr.metrics.lpips import VGG16Features
    from degsr.sr.config import SRConfig

    assert (SRConfig().mse_weight, SRConfig().lpips_weight, SRConfig().gan_weight) == (2.0, 5.0,
                                                                                        0.5)
    torch.manual_seed(1)
    torch.save(VGG16Features().state_dict(), tmp_path / "vgg16.pth")
    m, cfg = module("sr.neg_prob=0", f"sr.lpips_vgg={tmp_path}/vgg16.pth", "sr.mse_weight=2",
                    "sr.lpips_weight=5", "sr.gan_weight=0.5")
    b = batch(cfg)
    loss, terms, out = m.generator_loss(b, torch.Generator().manual_seed(0))
    sr, target = out["sr"].detach(), b["gt"] * 2 - 1
    mse = ((sr.double() - target.double()) ** 2).mean()
    with torch.no_grad():
        lp = m.lpips(sr, target).double().mean()
    assert set(terms) == {"mse", "lpips", "gan_g"} and abs(float(lp) - float(terms["gan_g"])) > 1e-2
    want = 2.0 * mse + 5.0 * lp + 0.5 * terms["gan_g"].detach().double()
    torch.testing.assert_close(loss.detach().double(), want, rtol=1e-5, atol=0)


def test_degradation_vector_is_the_estimator_on_the_lr_at_lr_size(tmp_path):
    """With a stage-1 export, d is that estimator (loaded here on its own) on the batch's LR at
    its own size (METHOD.md: the estimator sees the LR image), not on the upsampled input."""
    from degsr.estimator import DegradationEstimator, load_estimator, save_estimator, tiny_net

    torch.manual_seed(0)
    est = DegradationEstimator(tiny_net())
    est.reset_parameters(residual_scale=1.0)  # scores spread over (0, 1), not all near 0.5
    save_estimator(est, tmp_path / "est")
    m, cfg = module(f"sr.estimator={tmp_path}/est", "sr.gan_weight=0")
    b = batch(cfg)
    ref = load_estimator(tmp_path / "est")
    with torch.no_grad():
        want, upsampled = ref(b["lr"]), ref(b["lr_up"])
    assert b["lr_up"].shape[-1] == 4 * b["lr"].shape[-1]
    assert (want - upsampled).abs().max() > 1e-3  # the two inputs give different scores
    torch.testing.assert_close(m.degradation_vector(b), want, rtol=0, atol=1e-6)


def test_validation_quantises_to_the_8_bit_grid():
    """_q: [-1, 1] -> the value a saved 8-bit PNG holds, k / 255 with k = round((x + 1) 127.5),
    out-of-range values clamped first; worked out by hand."""
    from degsr.sr.module import _q

    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.3, 0.999, 1.0, 2.0])
    want = torch.tensor([0, 0, 64, 128, 166, 255, 255, 255]) / 255.0  # 63.75 165.75 254.87...
    assert torch.equal(_q(x), want)


def test_a_folder_that_is_no_estimator_export_names_the_key(tmp_path):
    from degsr.errors import UserError

    (tmp_path / "est").mkdir()
    with pytest.raises(UserError, match=rf"^sr\.estimator: estimator config not found: "
                                        rf"{tmp_path / 'est'}/estimator\.json$"):
        module(f"sr.estimator={tmp_path / 'est'}")
