"""One-step SR with SD-Turbo (METHOD.md, "Stage 2" and "Inference").

``encode_lr`` -> ``denoise`` -> ``decode``, kept separate so that a LightningModule can set the
LoRA modulation of the VAE encoder and of the UNet around each call::

    z   = vae.encode(lr_up).latent_dist.sample() * scaling_factor      # no noise added
    eps = unet(z, t, prompt embeddings)                                  # t = 999
    x0  = (z - sqrt(1 - a_t) eps) / sqrt(a_t)                            # a_t = alphas_cumprod[t]
    out = clamp(vae.decode(x0 / scaling_factor), -1, 1)

The formula for x0 follows the folder's ``scheduler.prediction_type``: ``epsilon`` (SD-Turbo,
above) or ``v_prediction`` (SD 2.1-768 style: ``x0 = sqrt(a_t) z - sqrt(1 - a_t) v``).

Classifier-free guidance is ONE UNet call on ``cat([z, z])`` with ``cat([pos, neg])`` embeddings,
``eps = eps_neg + g (eps_pos - eps_neg)``; ``g = 1`` is exactly the positive branch alone, so it
skips the second half. ``x0`` is computed in float32 at least: ``1 / sqrt(a_999)`` ~ 14.6 magnifies
the cancellation in ``z - sqrt(1 - a) eps``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from degsr.sr.components import SRComponents


def alpha_bar(scheduler: Any, t: int) -> float:
    """ᾱ_t = ``scheduler.alphas_cumprod[t]`` (≈ 0.00466 at t = 999 for SD's scaled-linear betas)."""
    ac = scheduler.alphas_cumprod
    n = len(ac)
    if not 0 <= int(t) < n:
        raise ValueError(f"timestep {t} outside the scheduler's [0, {n - 1}]")
    return float(ac[int(t)])


def x0_from_eps(z: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float | torch.Tensor
                ) -> torch.Tensor:
    """``(z - sqrt(1 - ᾱ) eps) / sqrt(ᾱ)`` (epsilon prediction, DDPM)."""
    if isinstance(alpha_bar_t, torch.Tensor):
        return (z - torch.sqrt(1 - alpha_bar_t) * eps) / torch.sqrt(alpha_bar_t)
    return (z - math.sqrt(1.0 - alpha_bar_t) * eps) / math.sqrt(alpha_bar_t)


def x0_from_v(z: torch.Tensor, v: torch.Tensor, alpha_bar_t: float) -> torch.Tensor:
    """``sqrt(ᾱ) z - sqrt(1 - ᾱ) v`` (v-prediction)."""
    return math.sqrt(alpha_bar_t) * z - math.sqrt(1.0 - alpha_bar_t) * v


X0_FROM = {"epsilon": x0_from_eps, "v_prediction": x0_from_v}  # scheduler.prediction_type


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's own weights. diffusers' ``model.dtype`` is its first parameter's,
    which after LoRA injection can be a float32 LoRA tensor on a half-precision model."""
    return next(p.dtype for n, p in model.named_parameters() if ".lora_" not in n)


def encode_lr(comp: SRComponents, lr_up: torch.Tensor, *,
              generator: Optional[torch.Generator] = None,
              posterior_mean: bool = False) -> torch.Tensor:
    """``(B, 3, H, W)`` in [-1, 1] -> latent ``(B, 4, H/f, W/f)`` (a sample of the posterior, or
    its mean, times the VAE's scaling factor). H and W must be multiples of ``f =
    comp.vae_scale_factor``."""
    if lr_up.dim() != 4 or lr_up.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(lr_up.shape)}")
    f = comp.vae_scale_factor
    if lr_up.shape[-2] % f or lr_up.shape[-1] % f:
        raise ValueError(f"image size {tuple(lr_up.shape[-2:])} must be a multiple of the VAE "
                         f"factor {f} (pad first)")
    vae = comp.vae
    x = lr_up.to(device=vae.device, dtype=base_dtype(vae))
    post = vae.encode(x).latent_dist
    z = post.mode() if posterior_mean else post.sample(generator=generator)
    return z * comp.scaling_factor


def _embeddings(comp: SRComponents, b: int, negative: Optional[torch.Tensor]) -> torch.Tensor:
    pos, neg = comp.pos_embeds, comp.neg_embeds
    if negative is None:
        return pos.expand(b, -1, -1)
    negative = torch.as_tensor(negative, device=pos.device).reshape(-1).bool()
    if negative.numel() != b:
        raise ValueError(f"negative must be a (B,) mask of {b} flags, got {negative.numel()}")
    return torch.where(negative[:, None, None], neg, pos)


def predict_output(comp: SRComponents, z: torch.Tensor, *,
                   guidance_scale: Optional[float] = None,
                   negative: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The UNet's output at ``comp.timestep`` (ε̂, or v̂ for a v-prediction folder); with
    ``guidance_scale`` (≠ 1) one batched CFG call."""
    b = z.shape[0]
    unet = comp.unet
    z = z.to(dtype=base_dtype(unet))
    cfg = guidance_scale is not None and float(guidance_scale) != 1.0
    if cfg and negative is not None:
        raise ValueError("negative (a per-sample prompt choice) and guidance_scale (CFG) "
                         "exclude each other")
    if cfg:
        pos, neg = comp.pos_embeds, comp.neg_embeds
        emb = torch.cat([pos.expand(b, -1, -1), neg.expand(b, -1, -1)])
        zz = torch.cat([z, z])
    else:
        emb, zz = _embeddings(comp, b, negative), z
    t = torch.full((zz.shape[0],), comp.timestep, dtype=torch.long, device=zz.device)
    eps = unet(zz, t, encoder_hidden_states=emb.to(dtype=z.dtype)).sample
    if cfg:
        eps_pos, eps_neg = eps.chunk(2)
        eps = eps_neg + float(guidance_scale) * (eps_pos - eps_neg)
    return eps


def denoise(comp: SRComponents, z: torch.Tensor, *, guidance_scale: Optional[float] = None,
            negative: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Latent ``z`` -> predicted clean latent ``x0`` (one step at ``comp.timestep``, no noise).
    CFG mixes the UNet's outputs, which x0 depends on affinely: the same as mixing x0."""
    out = predict_output(comp, z, guidance_scale=guidance_scale, negative=negative)
    wide = torch.promote_types(z.dtype, torch.float32)
    return X0_FROM[comp.prediction_type](z.to(wide), out.to(wide), comp.alpha_bar_t).to(z.dtype)


def decode(comp: SRComponents, x0: torch.Tensor) -> torch.Tensor:
    """Clean latent -> image ``(B, 3, H, W)`` clamped to [-1, 1] (the frozen decoder)."""
    vae = comp.vae
    img = vae.decode((x0 / comp.scaling_factor).to(dtype=base_dtype(vae))).sample
    return img.clamp(-1.0, 1.0)


def one_step_sr(comp: SRComponents, lr_up: torch.Tensor, *,
                guidance_scale: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Upsampled LR ``(B, 3, H, W)`` in [-1, 1] -> SR image of the same shape in [-1, 1].

    ``guidance_scale``: None = no CFG (the positive prompt); a float = CFG with one batched UNet
    call. ``generator`` draws the VAE posterior sample.
    """
    z = encode_lr(comp, lr_up, generator=generator)
    x0 = denoise(comp, z, guidance_scale=guidance_scale)
    return decode(comp, x0)
