"""Ranking pairs and anchors for stage 1, made on the fly by the degradation engine.

A pair is the same HR crop degraded twice with the same draw except one group of parameters:
the blur group (both blur kernels and their switches, the final sinc) or the noise group (both
noise draws and both JPEG qualities). Noise fields come from identical generator states, so
everything else in the pair is equal. The engine's scores of the two members give the order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from degsr.degradation.kernels import circular_sinc_kernels, gaussian_family_kernels, kernel_std
from degsr.degradation.pipeline import Degrader, quantize
from degsr.degradation.resize import clean_downsample
from degsr.degradation.scores import POISSON_SIGMA_PER_SCALE

BLUR_GROUP = ("blur1_", "blur2_", "final_sinc", "final_kernel_size", "final_omega_c")
BLUR_KERNELS = ("blur1", "blur2", "final")
NOISE_GROUP = ("noise1_", "noise2_", "jpeg1_", "jpeg2_")


def mix(base: dict, other: dict, group: tuple[str, ...], kernels: tuple[str, ...] = ()) -> dict:
    """``base`` with the parameters whose names start with ``group`` (and ``kernels``) from ``other``."""
    params = {k: (other["params"][k] if k.startswith(group) else v) for k, v in base["params"].items()}
    kern = {k: (other["kernels"][k] if k in kernels else v) for k, v in base["kernels"].items()}
    return {"params": params, "kernels": kern}


def _apply_same_noise(degrader: Degrader, hr: Tensor, draws: list[dict], g: torch.Generator):
    state = g.get_state()
    outs = []
    for draw in draws:
        g.set_state(state)
        outs.append(degrader.apply(hr, draw, g))
    return outs


def ranking_batches(degrader: Degrader, hr: Tensor, g: torch.Generator) -> dict[str, tuple]:
    """{"blur": (base_out, blur_swapped_out), "noise": (base_out, noise_swapped_out)}."""
    n = hr.shape[0]
    base, other = degrader.sample(n, g), degrader.sample(n, g)
    base["params"]["clean"] = torch.zeros_like(base["params"]["clean"])  # pairs are never clean
    a, b, c = _apply_same_noise(degrader, hr, [base, mix(base, other, BLUR_GROUP, BLUR_KERNELS),
                                              mix(base, other, NOISE_GROUP)], g)
    return {"blur": (a, b), "noise": (a, c)}


def clean_lr(hr: Tensor, scale: int) -> Tensor:
    """The anchor at 0: the antialiased bicubic downsample, as the engine's clean samples."""
    return quantize(clean_downsample(hr, scale))


def worst_draw(degrader: Degrader, n: int, g: torch.Generator) -> dict:
    """A draw at the preset's worst case for both scores (the anchor at 1; see scores.score_bounds)."""
    cfg = degrader.cfg
    draw = degrader.sample(n, g)
    p, k = draw["params"], draw["kernels"]
    dev, ones = g.device, torch.ones(n, device=g.device)
    for tag, rc in (("blur1", cfg.first), ("blur2", cfg.second)):
        sigma = rc.blur_sigma[1] * ones
        kern = gaussian_family_kernels(21, sigma, sigma, 0 * sigma)
        sinc_std = math.sqrt(2 * math.log(2)) / (math.pi / 5)
        use_sinc = rc.sinc_prob > 0 and sinc_std > rc.blur_sigma[1]
        if use_sinc:
            kern = circular_sinc_kernels(21, (math.pi / 5) * ones)
        k[tag] = kern.to(dev)
        p[f"{tag}_std"] = kernel_std(kern).to(dev)
        p[f"{tag}_omega_c"] = (math.pi / 5 if use_sinc else 0.0) * ones
        p[f"{tag}_applied"] = ones.bool()
    for i, rc in (("1", cfg.first), ("2", cfg.second)):
        p[f"resize{i}_scale"] = min(rc.resize_range[0], 1.0) * ones
        poisson = rc.poisson_scale[1] * POISSON_SIGMA_PER_SCALE > rc.noise_sigma[1]
        p[f"noise{i}_gaussian"] = ones.bool() if not poisson else ~ones.bool()
        p[f"noise{i}_sigma"] = rc.noise_sigma[1] * ones
        p[f"noise{i}_poisson_scale"] = rc.poisson_scale[1] * ones
        p[f"jpeg{i}_quality"] = rc.jpeg_quality[0] * ones
    p["final_sinc"] = ones.bool() if cfg.final_sinc_prob > 0 else ~ones.bool()
    p["final_omega_c"] = (math.pi / 3) * ones
    k["final"] = circular_sinc_kernels(21, p["final_omega_c"]).to(dev) if cfg.final_sinc_prob > 0 \
        else k["final"]
    p["clean"] = ~ones.bool()
    return draw
