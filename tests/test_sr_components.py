"""Stage-2 base: loading a diffusers folder, prompt encoding, the one-step x0 and CFG."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from degsr.errors import UserError
from degsr.sr.arch import SD_TURBO_SCHEDULER, SD_TURBO_TEXT, SD_TURBO_UNET, SD_TURBO_VAE
from degsr.sr.components import SRComponents, build_scheduler, load_components
from degsr.sr.folder_check import SUBFOLDERS
from degsr.sr.tiny_folder import save_tiny_pretrained
from degsr.sr.config import NEG_PROMPT, POS_PROMPT, ModelConfig
from degsr.sr.onestep import (alpha_bar, decode, denoise, encode_lr, one_step_sr,
                              predict_output, x0_from_eps)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_pretrained(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def comp(tiny_folder):
    return load_components(ModelConfig(pretrained=str(tiny_folder)))


def _image(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


# --------------------------------------------------------------------------- loading

def test_tiny_folder_layout(tiny_folder):
    for sub in SUBFOLDERS:
        assert (tiny_folder / sub).is_dir()
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert (tiny_folder / "tokenizer" / "vocab.json").is_file()
    assert (tiny_folder / "tokenizer" / "merges.txt").is_file()


def test_writing_a_tiny_folder_draws_no_progress_bar(tmp_path, capfd):
    """transformers' save draws "Writing model shards" even into a log file (the quickstart's
    stderr redirected); degsr's own bars show only on a terminal or with -v."""
    from transformers.utils import logging as tlog

    assert tlog.is_progress_bar_enabled()
    save_tiny_pretrained(tmp_path / "sd", seed=1)
    assert capfd.readouterr().err == ""
    assert tlog.is_progress_bar_enabled()  # put back as it was


def test_load_pretrained_embeddings_match_direct_encoding(tiny_folder, comp):
    from transformers import CLIPTextModel, CLIPTokenizer
    from safetensors.torch import load_file

    tok = CLIPTokenizer.from_pretrained(str(tiny_folder / "tokenizer"))
    te = CLIPTextModel.from_pretrained(str(tiny_folder / "text_encoder")).float().eval()
    ids = tok([POS_PROMPT, NEG_PROMPT], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    assert ids.shape == (2, 77)
    assert ids[0, 0].item() == tok.bos_token_id and ids[0, -1].item() == tok.pad_token_id
    with torch.no_grad():
        want = te(ids).last_hidden_state
    assert comp.pos_embeds.shape == comp.neg_embeds.shape == (1, 77, 32)
    torch.testing.assert_close(comp.pos_embeds, want[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(comp.neg_embeds, want[1:], rtol=0, atol=1e-6)
    assert not torch.allclose(comp.pos_embeds, comp.neg_embeds)

    # the text encoder is dropped: only unet and vae are modules; embeddings are not saved
    assert {name for name, _ in comp.named_children()} == {"unet", "vae"}
    assert not any(type(m).__name__.startswith("CLIP") for m in comp.modules())
    assert all(k.startswith(("unet.", "vae.")) for k in comp.state_dict())
    # the weights are the saved ones, frozen
    saved = load_file(str(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.testing.assert_close(comp.unet.conv_in.weight, saved["conv_in.weight"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in comp.parameters())
    assert comp.vae_scale_factor == 8 and comp.scaling_factor == pytest.approx(0.18215)
    assert comp.timestep == 999 and comp.alpha_bar_t == pytest.approx(0.00466, abs=1e-5)


def test_random_arch_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = load_components(ModelConfig(seed=3))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = load_components(ModelConfig(seed=3))
    assert isinstance(a, SRComponents) and a.pos_embeds.shape == (1, 77, 32)
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert torch.equal(a.pos_embeds, b.pos_embeds)


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


BAD_FOLDERS = {
    "missing vae": (lambda f: shutil.rmtree(f / "vae"),
                    ["vae/", "unet/", "text_encoder/", "tokenizer/", "scheduler/"]),
    "unet class": (lambda f: _edit(f / "unet" / "config.json", _class_name="UNet2DModel"),
                   ["unet", "_class_name", "UNet2DModel", "UNet2DConditionModel"]),
    "vae class": (lambda f: _edit(f / "vae" / "config.json", _class_name="AutoencoderTiny"),
                  ["vae", "_class_name", "AutoencoderTiny"]),
    "text class": (lambda f: _edit(f / "text_encoder" / "config.json",
                                   architectures=["CLIPTextModelWithProjection"]),
                   ["text_encoder", "CLIPTextModelWithProjection"]),
    "cross dim": (lambda f: _edit(f / "unet" / "config.json", cross_attention_dim=2048),
                  ["cross_attention_dim", "2048", "hidden_size", "32"]),
    "sdxl": (lambda f: _edit(f / "unet" / "config.json", addition_embed_type="text_time"),
             ["addition_embed_type", "text_time"]),
    "in channels": (lambda f: _edit(f / "unet" / "config.json", in_channels=9),
                    ["in_channels", "9"]),
    "latent": (lambda f: _edit(f / "vae" / "config.json", latent_channels=16),
               ["unet", "in_channels", "is 4", "latent_channels 16"]),
    "x0-pred": (lambda f: _edit(f / "scheduler" / "scheduler_config.json",
                                prediction_type="sample"),
                ["prediction_type", "sample", "v_prediction"]),
    "no weights": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
                   ["unet", "no weights file"]),
    "lfs pointer": (lambda f: (f / "text_encoder" / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n"),
                    ["text_encoder/model.safetensors is a git-lfs pointer", "git lfs pull"]),
    "lfs pointer bin": (lambda f: _as_bin_pointer(f / "unet"),
                        ["unet/diffusion_pytorch_model.bin is a git-lfs pointer"]),
    "truncated": (lambda f: _truncate(f / "text_encoder" / "model.safetensors"),
                  ["text_encoder/model.safetensors is truncated", "incomplete download"]),
    "truncated unet": (lambda f: _truncate(f / "unet" / "diffusion_pytorch_model.safetensors"),
                       ["unet/diffusion_pytorch_model.safetensors is truncated"]),
    "garbage": (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(
        b"\xff" * 64), ["vae/diffusion_pytorch_model.safetensors is not a readable safetensors"]),
    "bad vocab": (lambda f: (f / "tokenizer" / "vocab.json").write_text("{not json"),
                  ["cannot load tokenizer/"]),
    "unet lacks": (lambda f: _drop(f / "unet" / "diffusion_pytorch_model.safetensors", "conv_out."),
                   ["unet", "lack 2 tensor(s)", "conv_out.bias, conv_out.weight"]),
    "text lacks": (lambda f: _drop(f / "text_encoder" / "model.safetensors", "final_layer_norm."),
                   ["text_encoder", "lack 2 tensor(s)", "final_layer_norm"]),
}


def _as_bin_pointer(folder):
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop(path, prefix):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if not k.startswith(prefix)
               and f".{prefix}" not in k}, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folders_give_one_line_user_errors(tiny_folder, tmp_path, case):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    mutate, words = BAD_FOLDERS[case]
    mutate(folder)
    with pytest.raises(UserError) as err:
        load_components(ModelConfig(pretrained=str(folder)))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.pretrained:")
    for w in words:
        assert w in msg, (w, msg)


def test_a_stable_diffusion_that_is_not_sd_turbo_is_named_in_a_warning(tiny_folder, tmp_path,
                                                                         monkeypatch):
    """SD 1.5 (cross-attention 768, its text encoder 768 wide) and SD 2.1-768 (v-prediction) pass
    the folder check, as other bases do on purpose; a full-size SD UNet that is not SD-Turbo-like
    is said in one warning before anything loads. SD-Turbo itself and other sizes: nothing."""
    from degsr import console
    from degsr.sr.folder_check import unlike_sd_turbo

    turbo = {"unet": dict(SD_TURBO_UNET), "scheduler": dict(SD_TURBO_SCHEDULER)}
    assert unlike_sd_turbo(turbo) is None
    sd15 = {**turbo, "unet": {**SD_TURBO_UNET, "cross_attention_dim": 768}}
    assert "cross_attention_dim is 768 (SD 1.x" in unlike_sd_turbo(sd15)
    v768 = {**turbo, "scheduler": {**SD_TURBO_SCHEDULER, "prediction_type": "v_prediction"}}
    assert "prediction_type is 'v_prediction'" in unlike_sd_turbo(v768)
    tiny = {"unet": json.loads((tiny_folder / "unet" / "config.json").read_text()),
            "scheduler": {"prediction_type": "v_prediction"}}
    assert unlike_sd_turbo(tiny) is None  # not a full-size SD UNet: no opinion

    said = []
    monkeypatch.setattr(console.log, "warning", lambda msg, *a: said.append(msg % a if a else msg))
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    _edit(folder / "unet" / "config.json", block_out_channels=[320, 640, 1280, 1280])
    with pytest.raises(Exception):  # the tiny weights do not fit the full-size widths
        load_components(ModelConfig(pretrained=str(folder)))
    assert len(said) == 1 and said[0].startswith(f"model.pretrained: {folder} is not SD-Turbo: "
                                                 "unet cross_attention_dim is 32"), said


def test_a_bin_pointer_beside_safetensors_is_not_read(tiny_folder, comp, tmp_path):
    """`git lfs pull --include "*.safetensors"` leaves the .bin files as pointers: the libraries
    load the safetensors, and so does the check."""
    folder = tmp_path / "partial"
    shutil.copytree(tiny_folder, folder)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    got = load_components(ModelConfig(pretrained=str(folder)))
    assert torch.equal(got.unet.conv_in.weight, comp.unet.conv_in.weight)


def test_text_encoder_weights_load_in_float32_whatever_the_config_says(tiny_folder, comp, tmp_path):
    """SD 2.x / sd-turbo text_encoder configs carry "torch_dtype": "float16", which transformers
    >= 5 loads the float32 weights as: the prompt embeddings must not be rounded."""
    folder = tmp_path / "sd2"
    shutil.copytree(tiny_folder, folder)
    _edit(folder / "text_encoder" / "config.json", torch_dtype="float16", dtype="float16")
    got = load_components(ModelConfig(pretrained=str(folder)))
    torch.testing.assert_close(got.pos_embeds, comp.pos_embeds, rtol=0, atol=0)
    torch.testing.assert_close(got.neg_embeds, comp.neg_embeds, rtol=0, atol=0)


def test_a_folder_with_only_fp16_variant_weights_loads_them(tiny_folder, comp, tmp_path):
    """Hub downloads with variant="fp16" hold only *.fp16.safetensors; they load as the variant."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "fp16"
    shutil.copytree(tiny_folder, folder)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(str(folder / "unet"), variant="fp16")
    assert [p.name for p in (folder / "unet").glob("*.safetensors")] == [
        "diffusion_pytorch_model.fp16.safetensors"]
    got = load_components(ModelConfig(pretrained=str(folder)))
    for (name, a), b in zip(comp.unet.state_dict().items(), got.unet.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="folder not found: .*nowhere"):
        load_components(ModelConfig(pretrained=str(tmp_path / "nowhere")))
    assert any("pretrained" in p for p in ModelConfig(pretrained=str(tmp_path / "x")).problems())


# --------------------------------------------------------------------------- the one step

def test_x0_from_eps_closed_form():
    z = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    eps = torch.tensor([0.5, 1.0, -3.0], dtype=torch.float64)
    # ᾱ = 0.25: sqrt(ᾱ) = 0.5, sqrt(1 - ᾱ) = sqrt(3)/2
    want = torch.tensor([2 - math.sqrt(3) / 2, -4 - math.sqrt(3), 1 + 3 * math.sqrt(3)],
                        dtype=torch.float64)
    torch.testing.assert_close(x0_from_eps(z, eps, 0.25), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0_from_eps(z, eps, torch.tensor(0.25, dtype=torch.float64)),
                               want, rtol=0, atol=1e-12)


def test_alpha_bar_999_of_the_sd_schedule():
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    want = np.cumprod(1.0 - betas)
    sched = build_scheduler(SD_TURBO_SCHEDULER)
    assert alpha_bar(sched, 999) == pytest.approx(want[999], rel=1e-5)
    assert alpha_bar(sched, 500) == pytest.approx(want[500], rel=1e-5)
    assert want[999] == pytest.approx(0.00466, abs=1e-5)
    with pytest.raises(ValueError):
        alpha_bar(sched, 1000)


class _Counter:
    def __init__(self, unet):
        self.unet, self.batches = unet, []
        self.forward = unet.forward

    def __enter__(self):
        def counted(sample, *a, **k):
            self.batches.append(sample.shape[0])
            return self.forward(sample, *a, **k)
        self.unet.forward = counted
        return self

    def __exit__(self, *exc):
        del self.unet.forward


@torch.no_grad()
def test_cfg_is_one_batched_call_and_matches_the_formula(comp):
    x, g = _image(b=2), 1.07
    # the latent written out: a posterior sample times SD's 0.18215, no noise added
    post = comp.vae.encode(x).latent_dist
    z = post.sample(generator=torch.Generator().manual_seed(1)) * 0.18215
    torch.testing.assert_close(encode_lr(comp, x, generator=torch.Generator().manual_seed(1)), z,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encode_lr(comp, x, posterior_mean=True), post.mean * 0.18215,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(post.mean, post.sample(generator=torch.Generator().manual_seed(1)),
                              atol=1e-3)
    with _Counter(comp.unet) as c:
        out = one_step_sr(comp, x, guidance_scale=g, generator=torch.Generator().manual_seed(1))
    assert c.batches == [4]

    t = torch.full((2,), 999)
    e_pos = comp.unet(z, t, encoder_hidden_states=comp.pos_embeds.expand(2, -1, -1)).sample
    e_neg = comp.unet(z, t, encoder_hidden_states=comp.neg_embeds.expand(2, -1, -1)).sample
    eps = e_neg + g * (e_pos - e_neg)
    ab = comp.alpha_bar_t
    x0 = (z - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    want = comp.vae.decode(x0 / comp.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)

    # g = 1 is the positive branch alone, one call of batch B
    with _Counter(comp.unet) as c:
        e1 = predict_output(comp, z, guidance_scale=1.0)
    assert c.batches == [2]
    torch.testing.assert_close(e1, e_pos, rtol=1e-5, atol=1e-5)

    # per-sample negative prompt without CFG
    e_mix = predict_output(comp, z, negative=torch.tensor([True, False]))
    torch.testing.assert_close(e_mix[0], e_neg[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e_mix[1], e_pos[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        predict_output(comp, z, guidance_scale=g, negative=torch.tensor([True, False]))


@torch.no_grad()
def test_v_prediction_folder_with_16_latent_channels(tmp_path):
    """A v-prediction scheduler and a 16-channel latent space (both read from the folder): x0 is
    sqrt(ᾱ) z - sqrt(1 - ᾱ) v̂, computed here in float64 from the UNet's own output."""
    folder = save_tiny_pretrained(tmp_path / "v16", seed=1, vae={"latent_channels": 16},
                                  unet={"in_channels": 16, "out_channels": 16},
                                  scheduler={"prediction_type": "v_prediction"})
    comp = load_components(ModelConfig(pretrained=str(folder)))
    assert comp.prediction_type == "v_prediction"
    z = encode_lr(comp, _image(b=2, size=64, seed=3), generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 16, 8, 8)
    t = torch.full((2,), 999)
    v = comp.unet(z, t, encoder_hidden_states=comp.pos_embeds.expand(2, -1, -1)).sample.double()
    ab = float(np.cumprod(1.0 - np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2)[999])
    want = math.sqrt(ab) * z.double() - math.sqrt(1.0 - ab) * v
    torch.testing.assert_close(denoise(comp, z).double(), want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_output_shape_and_range(comp):
    x = _image(b=2, size=64, seed=2) * 3            # out-of-range input must still give [-1, 1]
    z = encode_lr(comp, x)
    assert z.shape == (2, 4, 8, 8)
    y = decode(comp, denoise(comp, z))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert one_step_sr(comp, _image(b=1, size=128)).shape == (1, 3, 128, 128)
    with pytest.raises(ValueError, match="multiple of the VAE factor 8"):
        encode_lr(comp, _image(b=1, size=60))


def test_sd_turbo_sizes_on_meta():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_TURBO_UNET)
        vae = AutoencoderKL(**SD_TURBO_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD_TURBO_TEXT))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(unet) == pytest.approx(866e6, rel=2e-3)
    assert count(vae) == pytest.approx(83.65e6, rel=2e-3)
    assert count(text) == pytest.approx(340.4e6, rel=2e-3)     # OpenCLIP-H text, 23 layers

    comp = load_components(ModelConfig(arch="sd-turbo"), device="meta")
    assert comp.unet.device.type == "meta"
    assert count(comp.unet) == count(unet) and count(comp.vae) == count(vae)
    assert comp.pos_embeds.shape == (1, 77, 1024) and comp.vae_scale_factor == 8


def test_euler_scheduler_config_loads_as_ddpm(tiny_folder, tmp_path):
    """sd-turbo's folder ships an EulerDiscreteScheduler config: only its schedule is used."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    _edit(folder / "scheduler" / "scheduler_config.json", _class_name="EulerDiscreteScheduler",
          interpolation_type="linear", use_karras_sigmas=False, set_alpha_to_one=False)
    comp = load_components(ModelConfig(pretrained=str(folder)))
    assert type(comp.scheduler).__name__ == "DDPMScheduler"
    assert comp.alpha_bar_t == pytest.approx(0.00466, abs=1e-5)
