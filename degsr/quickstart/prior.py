"""The quickstart's stand-in for a downloaded SD-Turbo: the ``tiny`` architecture, fitted for a few
minutes on the shard crops and saved as a diffusers folder in the real layout.

Why. Stage 2 keeps the VAE decoder frozen and reads the image off ``decode(x0)``; with SD-Turbo
that decoder turns latents into photos and the UNet already maps a latent at t = 999 to a clean
one. A random tiny VAE decodes every latent to noise and a random UNet's
``x0 = (z - √(1-ᾱ) ε̂) / √ᾱ`` (``1/√ᾱ₉₉₉ ≈ 14.6``) is far from any image, so nothing stage 2
learns in minutes could show. This module gives the tiny model the two properties stage 2 relies
on, nothing more:

0. **An architecture that can learn in minutes** (:data:`PRIOR_ARCH`): the ``tiny`` layout with a
   3-block VAE (4x downsampling) into 16 latent channels instead of 4 blocks (8x) into 4, and a
   v-prediction scheduler instead of epsilon. Both are read from the folder by the same loading
   code as SD-Turbo's. Measured on CPU-2 (held-out photos, bicubic LR, wavelet colour fix): the 8x
   / 4-channel tiny VAE reconstructs at 13-17 dB after minutes of fitting, far below bicubic;
   the 4x / 16-channel one at 27-30 dB. With epsilon prediction at t = 999 every UNet error is
   magnified 1/sqrt(ᾱ) ≈ 14.6 times in x0; a minutes-fitted UNet then restores worse than doing
   nothing (latent MSE 0.32 vs 0.14 for the input as is); with v-prediction x0 = sqrt(ᾱ) z -
   sqrt(1-ᾱ) v̂ carries the error unmagnified (0.025).
1. **VAE as an autoencoder** (``vae_steps``): L1 between random crops (flipped at
   random; ``vae_soft`` of them softened as below, the kind of input stage 2 and ``degsr sr``
   encode) and their reconstruction through a posterior *sample*, as stage 2 encodes. The
   log-variance half of ``quant_conv`` starts at zero weight and bias ``LOGVAR_INIT`` (posterior
   std ``e^-4``), so samples stay close to the mean; a ``KL_WEIGHT`` KL term keeps it a VAE.
   Then ``scaling_factor = 1 / std(latents)``, the way SD's 0.18215 was chosen. Both fits decay
   their learning rate along a cosine over their steps (:func:`_anneal`), never over time: the
   same steps give the same prior on a slow machine (one its time cap stops ends un-annealed).
2. **UNet as a one-step restorer** (``unet_steps``): at t = 999, through the same
   :func:`degsr.sr.onestep.denoise` stage 2 uses, the latent of a softened crop (bicubic down by a
   random factor in [1, 4] and back up, Gaussian noise of σ ≤ ``MAX_NOISE``) must map to the
   latent of the crop (MSE on x0); each sample takes the positive or the negative prompt at random,
   so guidance starts neutral and stage 2's online negatives teach the difference.

The folder is written by :func:`degsr.sr.tiny_folder.save_tiny_pretrained` (unet/ vae/
text_encoder/ tokenizer/ scheduler/ model_index.json), loaded with
:func:`~degsr.sr.components.load_components` like any SD-Turbo folder, fitted, saved back with
``save_pretrained`` and stamped with ``quickstart_prior.json``. It is built under a temporary name
and renamed when complete, so a folder at the final path is always whole.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from degsr import console
from degsr.data.shard_sets import expand_shard_pattern
from degsr.data.samples import decode_image, read_shard
from degsr.data.stream import random_crop, reflect_pad
from degsr.seeding import make_generator

STAMP = "quickstart_prior.json"
# What the stand-in changes in the ``tiny`` architecture (module docstring, point 0).
PRIOR_ARCH = {
    "vae": {"block_out_channels": [32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "latent_channels": 16},
    "unet": {"in_channels": 16, "out_channels": 16},
    "scheduler": {"prediction_type": "v_prediction"},
}
LOGVAR_INIT = -8.0
KL_WEIGHT = 1e-6
MAX_NOISE = 0.05          # on the [-1, 1] scale
LOG_EVERY_S = 15.0


@dataclass
class PriorSettings:
    """How the tiny prior is fitted (the quickstart sets the steps and caps from ``--minutes``).
    Each fit makes its steps unless its time cap (seconds) comes first."""

    vae_steps: int = 1400
    unet_steps: int = 600
    vae_cap: float = 3600.0
    unet_cap: float = 3600.0
    vae_crop: int = 32         # crop sides in pixels (multiples of 8): small VAE crops = more
    vae_batch: int = 8         # steps in the budget, which matters more than crop size here
    unet_crop: int = 64
    unet_batch: int = 4
    vae_lr: float = 2e-3
    vae_soft: float = 0.5      # share of the VAE's crops softened first (see soften)
    unet_lr: float = 5e-4
    seed: int = 0


# --------------------------------------------------------------------------- data

def shard_images(shards: str | Path) -> list[np.ndarray]:
    """Every image of the shards as (H, W, 3) uint8 (the quickstart's photos fit in memory)."""
    images = []
    for url in expand_shard_pattern(str(shards)):
        for _, parts in read_shard(url):
            images.append(decode_image(parts))
    return images


def sample_crops(images: list[np.ndarray], n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) float crops in [-1, 1]: random image, position, flip, all from ``g``."""
    crops = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=g))]
        crops.append(random_crop(reflect_pad(img, size), size, g))
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def soften(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per sample: bicubic down by a factor in [1, 4] and back up, plus Gaussian noise of
    σ ∈ [0, MAX_NOISE]; the UNet's input during its fit."""
    out = []
    size = x.shape[-2:]
    for xi in x:
        f = 1.0 + 3.0 * float(torch.rand(1, generator=g))
        small = (max(1, round(size[0] / f)), max(1, round(size[1] / f)))
        y = F.interpolate(xi[None], size=small, mode="bicubic", antialias=True, align_corners=False)
        y = F.interpolate(y, size=size, mode="bicubic", align_corners=False)
        sigma = MAX_NOISE * float(torch.rand(1, generator=g))
        out.append(y[0] + sigma * torch.randn(y.shape[1:], generator=g))
    return torch.stack(out).clamp(-1, 1)


# --------------------------------------------------------------------------- fits

class _Budget:
    """``steps`` steps unless ``cap`` seconds come first, and a progress line every LOG_EVERY_S
    seconds: ``prior/<what>: step N / steps, <metric>, t s (cap c s)``."""

    def __init__(self, what: str, steps: int, cap: float):
        self.what, self.steps, self.cap = what, steps, cap
        self.t0, self.last = time.monotonic(), 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def running(self, step: int) -> bool:
        return step < self.steps and (step == 0 or self.elapsed() < self.cap)

    def __call__(self, step: int, text: str, force: bool = False) -> None:
        now = self.elapsed()
        if force or now - self.last >= LOG_EVERY_S:
            self.last = now
            console.log.info(f"  prior/{self.what}: step {step} / {self.steps}, {text}, "
                             f"{now:.0f} s (cap {self.cap:.0f} s)")

    def result(self, step: int, **metrics) -> dict:
        return {"steps": step, "planned_steps": self.steps, "capped": step < self.steps,
                "seconds": round(self.elapsed(), 1), **metrics}


def _anneal(opt, base: float, progress: float) -> None:
    """Cosine decay of the learning rate over the fit (``progress`` in [0, 1]): a fit that ends
    on a small step size lands nearer a minimum than one cut at the full rate."""
    for group in opt.param_groups:
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _psnr(mse: float) -> float:
    return 10 * math.log10(4.0 / max(mse, 1e-12))  # images in [-1, 1]: peak-to-peak 2


def fit_vae(vae, images, s: PriorSettings) -> dict:
    """Autoencoder fit (see the module docstring); returns steps and reconstruction PSNR."""
    g = make_generator(s.seed, 11)
    with torch.no_grad():  # posterior std e^(LOGVAR_INIT/2): samples stay near the mean
        lat = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[lat:].zero_()
        vae.quant_conv.bias[lat:].fill_(LOGVAR_INIT)
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    tick, step, ema = _Budget("vae", s.vae_steps, s.vae_cap), 0, None
    while tick.running(step):
        _anneal(opt, s.vae_lr, step / tick.steps)
        x = sample_crops(images, s.vae_batch, s.vae_crop, g)
        soft = (torch.rand(x.shape[0], generator=g) < s.vae_soft).view(-1, 1, 1, 1)
        x = torch.where(soft, soften(x, g), x)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.l1_loss(rec, x) + KL_WEIGHT * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        mse = float(F.mse_loss(rec.detach().clamp(-1, 1), x))
        ema = mse if ema is None else 0.9 * ema + 0.1 * mse
        tick(step, f"reconstruction PSNR {_psnr(ema):.1f} dB")
    tick(step, f"reconstruction PSNR {_psnr(ema):.1f} dB", force=True)
    vae.requires_grad_(False).eval()
    return tick.result(step, train_psnr=round(_psnr(ema), 2))


@torch.no_grad()
def latent_scale(vae, images, s: PriorSettings, n: int = 32) -> float:
    """``1 / std`` of the posterior means of ``n`` crops: latents of unit variance, as SD's."""
    x = sample_crops(images, n, s.unet_crop, make_generator(s.seed, 12))
    return float(1.0 / vae.encode(x).latent_dist.mean.std().clamp_min(1e-6))


def fit_unet(comp, images, s: PriorSettings) -> dict:
    """One-step restorer fit at ``comp.timestep`` (see the module docstring)."""
    from degsr.sr.onestep import denoise

    g = make_generator(s.seed, 13)
    comp.unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(comp.unet.parameters(), lr=s.unet_lr, weight_decay=0.0)
    tick, step, ema = _Budget("unet", s.unet_steps, s.unet_cap), 0, None
    while tick.running(step):
        _anneal(opt, s.unet_lr, step / tick.steps)
        x = sample_crops(images, s.unet_batch, s.unet_crop, g)
        with torch.no_grad():
            z_in = comp.vae.encode(soften(x, g)).latent_dist.sample(generator=g)
            z_in = z_in * comp.scaling_factor
            z_hr = comp.vae.encode(x).latent_dist.mean * comp.scaling_factor
        negative = torch.rand(x.shape[0], generator=g) < 0.5
        x0 = denoise(comp, z_in, negative=negative)
        loss = F.mse_loss(x0, z_hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(comp.unet.parameters(), 1.0)
        opt.step()
        step += 1
        value = loss.item()
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        tick(step, f"latent MSE {ema:.3f} (input as is: {float(F.mse_loss(z_in, z_hr)):.3f})")
    tick(step, f"latent MSE {ema:.3f}", force=True)
    comp.unet.requires_grad_(False).eval()
    return tick.result(step, latent_mse=round(ema, 4))


# --------------------------------------------------------------------------- the folder

def is_complete(folder: str | Path) -> bool:
    """A prior folder this module finished (its stamp is written last, before the rename)."""
    return (Path(folder) / STAMP).is_file()


def build_prior(shards: str | Path, folder: str | Path, s: PriorSettings) -> dict:
    """Fit the tiny prior on the images of ``shards`` and write it to ``folder`` (a diffusers
    folder in SD-Turbo's layout). Returns what the stamp records (settings, steps, PSNR)."""
    from degsr.sr.components import load_components
    from degsr.sr.tiny_folder import save_tiny_pretrained
    from degsr.sr.config import ModelConfig

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # ours: an interrupted earlier fit
    images = shard_images(shards)
    save_tiny_pretrained(tmp, seed=s.seed, **PRIOR_ARCH)
    comp = load_components(ModelConfig(pretrained=str(tmp)))
    vae = fit_vae(comp.vae, images, s)
    comp.scaling_factor = latent_scale(comp.vae, images, s)
    unet = fit_unet(comp, images, s)
    comp.vae.register_to_config(scaling_factor=comp.scaling_factor)
    comp.vae.save_pretrained(tmp / "vae")
    comp.unet.save_pretrained(tmp / "unet")
    stamp = {"what": "tiny SD-Turbo stand-in fitted by `degsr quickstart` "
                     "(degsr/quickstart/prior.py)",
             "images": len(images), "settings": asdict(s), "arch_changes": PRIOR_ARCH,
             "vae": vae, "unet": unet, "scaling_factor": round(comp.scaling_factor, 6)}
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    tmp.replace(folder)
    return stamp
