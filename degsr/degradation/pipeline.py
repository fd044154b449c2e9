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
from degsr.degradation.jpeg import jpeg
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
    """The degradation engine for one preset (a ``DegradationConfig``).

    ``sample(n, g)`` draws every parameter of ``n`` samples (and builds their kernels);
    ``apply(hr, draw, g)`` runs the chain with them, taking only the noise fields from ``g``.
    ``degrader(hr, g)`` does both. Splitting them lets callers degrade the same crop with
    controlled changes (stage-1 ranking pairs) or keep a fixed validation draw.
    """

    def __init__(self, cfg: DegradationConfig | DictConfig):
        self.cfg = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg

    @staticmethod
    def _round(g: torch.Generator, n: int, rc, tag: str, p: dict, k: dict, dtype) -> None:
        kernels, kp = sample_blur_kernels(
            n, g, kernel_sizes=rc.kernel_sizes, kernel_types=rc.kernel_types,
            kernel_probs=rc.kernel_probs, sigma_range=rc.blur_sigma, betag_range=rc.betag,
            betap_range=rc.betap, sinc_prob=rc.sinc_prob, dtype=dtype)
        k[tag] = kernels
        p.update({f"{tag}_{name.removeprefix('blur_')}": v for name, v in kp.items()})
        p[f"{tag}_applied"] = ops.bernoulli(g, n, rc.blur_prob)
        i = tag[-1]
        p[f"resize{i}_scale"], p[f"resize{i}_kind"] = ops.scale_factors(g, n, rc.resize_probs,
                                                                      rc.resize_range)
        p[f"resize{i}_mode"] = _mode_draw(g, n, rc.resize_modes)
        p[f"noise{i}_gaussian"] = ops.bernoulli(g, n, rc.gaussian_noise_prob)
        p[f"noise{i}_gray"] = ops.bernoulli(g, n, rc.gray_noise_prob)
        p[f"noise{i}_sigma"] = ops.uniform(g, n, *rc.noise_sigma)
        p[f"noise{i}_poisson_scale"] = ops.uniform(g, n, *rc.poisson_scale)
        p[f"jpeg{i}_quality"] = ops.uniform(g, n, *rc.jpeg_quality)

    def sample(self, n: int, g: torch.Generator, dtype=torch.float32) -> dict:
        """Every parameter of ``n`` samples: ``{"params": {name: (n,)}, "kernels": {...}}``."""
        cfg, p, k = self.cfg, {}, {}
        self._round(g, n, cfg.first, "blur1", p, k, dtype)
        self._round(g, n, cfg.second, "blur2", p, k, dtype)
        k["final"], sp = sample_sinc_kernels(n, g, kernel_sizes=cfg.final_kernel_sizes,
                                             prob=cfg.final_sinc_prob, dtype=dtype)
        p.update(sp)
        p["final_jpeg_first"] = ops.bernoulli(g, n, 0.5)
        p["final_mode"] = _mode_draw(g, n, cfg.final_resize_modes)
        p["clean"] = ops.bernoulli(g, n, cfg.no_degradation_prob)
        return {"params": p, "kernels": k}

    @staticmethod
    def _blur(x: Tensor, draw: dict, tag: str) -> Tensor:
        applied = draw["params"][f"{tag}_applied"].view(-1, 1, 1, 1)
        return torch.where(applied, filter_per_sample(x, draw["kernels"][tag]), x)

    @staticmethod
    def _noise(x: Tensor, p: dict, i: str, g: torch.Generator) -> Tensor:
        gray = p[f"noise{i}_gray"]
        noise = torch.where(p[f"noise{i}_gaussian"].view(-1, 1, 1, 1),
                            ops.gaussian_noise(g, x, p[f"noise{i}_sigma"], gray),
                            ops.poisson_noise(g, x, p[f"noise{i}_poisson_scale"], gray))
        return (x + noise).clamp(0, 1)

    @staticmethod
    def _resize(x: Tensor, p: dict, i: str, rc, size, base: tuple[int, int]):
        """Resize sample b to base * factor[b] (the reference's sizes are relative to ``base``)."""
        new = tuple((b * p[f"resize{i}_scale"]).to(torch.long).clamp(min=1) for b in base)
        canvas = tuple(max(1, int(b * max(1.0, rc.resize_range[1]))) for b in base)
        return resize_batch(x, *size, *new, p[f"resize{i}_mode"], canvas), new

    def __call__(self, hr: Tensor, generator: torch.Generator) -> dict:
        return self.apply(hr, self.sample(hr.shape[0], generator), generator)

    def apply(self, hr: Tensor, draw: dict, generator: torch.Generator) -> dict:
        cfg, g, p = self.cfg, generator, draw["params"]
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
        size = (torch.full((b,), h, device=hr.device), torch.full((b,), w, device=hr.device))

        # first order: blur -> resize (relative to HR) -> noise -> JPEG
        x, size = self._resize(self._blur(gt, draw, "blur1"), p, "1", cfg.first, size, (h, w))
        x = jpeg(self._noise(x, p, "1", g), p["jpeg1_quality"])
        # second order: blur -> resize (relative to the LR size, as the reference) -> noise
        x, size = self._resize(self._blur(x, draw, "blur2"), p, "2", cfg.second, size, (lr_h, lr_w))
        x = self._noise(x, p, "2", g)
        # final: [resize to LR + sinc] and JPEG, in a random order per sample
        first = p["final_jpeg_first"].view(-1, 1, 1, 1)
        x = torch.where(first, jpeg(x, p["jpeg2_quality"]), x)
        lr_size = (torch.full_like(size[0], lr_h), torch.full_like(size[1], lr_w))
        x = resize_batch(x, *size, *lr_size, p["final_mode"], (lr_h, lr_w))
        x = filter_per_sample(x, draw["kernels"]["final"])
        lr = quantize(torch.where(first, x, jpeg(x, p["jpeg2_quality"])))

        # the no-degradation switch: the LR is the clean (antialiased bicubic) downsample
        clean_lr = quantize(F.interpolate(hr, size=(lr_h, lr_w), mode="bicubic", antialias=True,
                                          align_corners=False))
        lr = torch.where(p["clean"].view(-1, 1, 1, 1), clean_lr, lr)
        lr_up = F.interpolate(lr, size=(h, w), mode=cfg.upsample_mode,
                              **({} if cfg.upsample_mode == "nearest" else {"align_corners": False}))
        return {"hr": hr, "gt": gt, "lr": lr, "lr_up": lr_up.clamp(0, 1), "clean": p["clean"],
                "scores": degradation_scores(p, cfg), "params": dict(p)}
