"""The Real-ESRGAN second-order degradation, batched, every draw per sample (METHOD.md).

``Degrader(cfg)(hr, generator)`` turns a batch of HR crops in [0, 1] into a dict:

- ``hr``: the HR crops as given; ``gt``: the training target (USM-sharpened when
  ``usm_sharpen``, else ``hr``; the LR is synthesised from it, as Real-ESRGAN does);
- ``lr``: (B, 3, H/scale, W/scale), clamped and quantised to 1/255;
- ``lr_up``: the LR upsampled back to H x W with ``upsample_mode`` (clamped to [0, 1]);
- ``scores``: (B, 2) [blur, noise] in [0, 1] (see :mod:`degsr.degradation.scores`);
- ``clean``: (B,) bool, the no-degradation samples (LR = antialiased bicubic downsample of HR);
- ``params``: every sampled parameter, (B,) tensors.

Samples whose sizes differ after a resize share a canvas (see :mod:`degsr.degradation.resize`).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from degsr.config.schema import DegradationConfig
from degsr.degradation import ops
from degsr.degradation.kernels import filter_per_sample, sample_blur_kernels, sample_sinc_kernels
from degsr.degradation.resize import RESIZE_MODES, resize_batch
from degsr.degradation.scores import degradation_scores
from degsr.errors import UserError


def _mode_draw(g: torch.Generator, n: int, allowed) -> Tensor:
    ids = torch.tensor([RESIZE_MODES.index(m) for m in allowed], device=g.device)
    return ids[torch.randint(len(ids), (n,), generator=g, device=g.device)]


def quantize(x: Tensor) -> Tensor:
    return (x * 255.0).round().clamp(0, 255) / 255.0


class Degrader:
    """Callable degradation engine for one preset (a ``DegradationConfig``)."""

    def __init__(self, cfg: DegradationConfig | DictConfig):
        self.cfg = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg

    def _blur(self, x: Tensor, g: torch.Generator, rc, tag: str, p: dict) -> Tensor:
        kernels, kp = sample_blur_kernels(
            x.shape[0], g, kernel_sizes=rc.kernel_sizes, kernel_types=rc.kernel_types,
            kernel_probs=rc.kernel_probs, sigma_range=rc.blur_sigma, betag_range=rc.betag,
            betap_range=rc.betap, sinc_prob=rc.sinc_prob, dtype=x.dtype)
        applied = ops.bernoulli(g, x.shape[0], rc.blur_prob)
        p.update({f"{tag}_{k.removeprefix('blur_')}": v for k, v in kp.items()})
        p[f"{tag}_applied"] = applied
        return torch.where(applied.view(-1, 1, 1, 1), filter_per_sample(x, kernels), x)

    def _noise(self, x: Tensor, g: torch.Generator, rc, tag: str, p: dict) -> Tensor:
        n = x.shape[0]
        gaussian = ops.bernoulli(g, n, rc.gaussian_noise_prob)
        gray = ops.bernoulli(g, n, rc.gray_noise_prob)
        sigma = ops.uniform(g, n, *rc.noise_sigma)
        pscale = ops.uniform(g, n, *rc.poisson_scale)
        noise = torch.where(gaussian.view(-1, 1, 1, 1), ops.gaussian_noise(g, x, sigma, gray),
                            ops.poisson_noise(g, x, pscale, gray))
        p.update({f"{tag}_gaussian": gaussian, f"{tag}_gray": gray, f"{tag}_sigma": sigma,
                  f"{tag}_poisson_scale": pscale})
        return (x + noise).clamp(0, 1)

    def _resize(self, x: Tensor, g: torch.Generator, rc, size: tuple[Tensor, Tensor],
                base: tuple[int, int], tag: str, p: dict) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Resize sample b to base * factor[b] (the reference's sizes are relative to ``base``)."""
        n = x.shape[0]
        factor, kind = ops.scale_factors(g, n, rc.resize_probs, rc.resize_range)
        mode = _mode_draw(g, n, rc.resize_modes)
        new = tuple((b * factor).to(torch.long).clamp(min=1) for b in base)
        canvas = tuple(max(1, int(b * max(1.0, rc.resize_range[1]))) for b in base)
        p.update({f"{tag}_scale": factor, f"{tag}_kind": kind, f"{tag}_mode": mode})
        return resize_batch(x, *size, *new, mode, canvas), new

    def __call__(self, hr: Tensor, generator: torch.Generator) -> dict:
        cfg, g = self.cfg, generator
        b, c, h, w = hr.shape
        s = cfg.scale
        if c != 3 or h % s or w % s:
            raise UserError(f"degradation: HR batch must be (B, 3, H, W) with H, W multiples of "
                            f"scale {s}; got {tuple(hr.shape)}")
        if hr.device != g.device:
            raise ValueError(f"generator on {g.device} but images on {hr.device}")
        hr = hr if hr.is_floating_point() else hr.float() / 255.0  # uint8 crops from the loader
        gt = (ops.usm_sharpen(hr, cfg.usm_weight, cfg.usm_threshold, cfg.usm_radius, cfg.usm_sigma)
              if cfg.usm_sharpen else hr)
        lr_h, lr_w = h // s, w // s
        full = (torch.full((b,), h, device=hr.device), torch.full((b,), w, device=hr.device))
        p: dict[str, Tensor] = {}

        # first order: blur -> resize (relative to HR) -> noise -> JPEG
        x = self._blur(gt, g, cfg.first, "blur1", p)
        x, size = self._resize(x, g, cfg.first, full, (h, w), "resize1", p)
        x = self._noise(x, g, cfg.first, "noise1", p)
        p["jpeg1_quality"] = ops.uniform(g, b, *cfg.first.jpeg_quality)
        x = ops.jpeg(x, p["jpeg1_quality"])

        # second order: blur -> resize (relative to the LR size, as the reference) -> noise
        x = self._blur(x, g, cfg.second, "blur2", p)
        x, size = self._resize(x, g, cfg.second, size, (lr_h, lr_w), "resize2", p)
        x = self._noise(x, g, cfg.second, "noise2", p)

        # final: [resize to LR + sinc] and JPEG, in a random order per sample
        kernels, sp = sample_sinc_kernels(b, g, kernel_sizes=cfg.final_kernel_sizes,
                                          prob=cfg.final_sinc_prob, dtype=x.dtype)
        p.update(sp)
        p["final_jpeg_first"] = ops.bernoulli(g, b, 0.5)
        p["final_mode"] = _mode_draw(g, b, cfg.final_resize_modes)
        p["jpeg2_quality"] = ops.uniform(g, b, *cfg.second.jpeg_quality)
        first = p["final_jpeg_first"].view(-1, 1, 1, 1)
        x = torch.where(first, ops.jpeg(x, p["jpeg2_quality"]), x)
        lr_size = (torch.full_like(size[0], lr_h), torch.full_like(size[1], lr_w))
        x = filter_per_sample(resize_batch(x, *size, *lr_size, p["final_mode"], (lr_h, lr_w)), kernels)
        x = torch.where(first, x, ops.jpeg(x, p["jpeg2_quality"]))
        lr = quantize(x)

        # the no-degradation switch: the LR is the clean (antialiased bicubic) downsample
        p["clean"] = ops.bernoulli(g, b, cfg.no_degradation_prob)
        clean_lr = quantize(F.interpolate(hr, size=(lr_h, lr_w), mode="bicubic", antialias=True,
                                          align_corners=False))
        lr = torch.where(p["clean"].view(-1, 1, 1, 1), clean_lr, lr)
        lr_up = F.interpolate(lr, size=(h, w), mode=cfg.upsample_mode,
                              **({} if cfg.upsample_mode == "nearest" else {"align_corners": False}))
        return {"hr": hr, "gt": gt, "lr": lr, "lr_up": lr_up.clamp(0, 1), "clean": p["clean"],
                "scores": degradation_scores(p, cfg), "params": p}
