"""Degradation scores (blur, noise) in [0, 1] modelled from the sampled parameters.

The stage-1 labels by default are measured by the engine instead (``degradation.blur_label`` and
``noise_label`` = ``measured``: :meth:`~degsr.degradation.pipeline.Degrader.measured_blur` and
the noise re-render in ``Degrader.apply``); these models stay available as ``params``.

**Blur** is the effective standard deviation, in LR pixels, of all the linear smoothing the chain
applied: the variances of the blur kernels add (each converted to HR pixels: the second blur acts
on an image resized by ``s1``, the final sinc on the LR), plus the box blur implied by the
coarsest resolution the image passed through (``(1/r)²/12`` for resolution ``r`` relative to HR;
never less than the final 1/scale). A sinc counts as the Gaussian whose response halves at its
cutoff. ``σ_LR = sqrt(var_HR) / scale``, mapped linearly from the clean value (no kernel, just the
final downsample) to the preset's worst case and clipped to [0, 1].

**Noise** combines noise and JPEG *as visible in the LR*: each round's artefacts are divided by
how much the later resampling averages them away (round 1 by ``s1·scale``, round 2 by
``max(1, s2)``, see :func:`_attenuation`). ``a`` = the visible noise std (both rounds in
quadrature; a Poisson draw counts as its std at mid-grey, ``scale·sqrt(0.5/256)``) over the
preset's largest; ``b`` = the stronger visible JPEG, ``(100 - q)/(100 - lowest quality)`` over its
attenuation; ``noise = (a + b) / 2``. (Counting round-1 noise at face value made the label
track something the LR barely shows: on one crop degraded 128 ways its correlation with any
noise measure of the LR was ~0.) Both scores are non-decreasing in every parameter they
read and are 0 for a clean (no-degradation) sample.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from degsr.degradation.ops import POISSON_LEVELS, sinc_equivalent_sigma

POISSON_SIGMA_PER_SCALE = math.sqrt(0.5 / POISSON_LEVELS) * 255.0  # in 1/255 units


def _box_var(resolution: Tensor | float) -> Tensor | float:
    return (1.0 / resolution) ** 2 / 12.0


def _kernel_std(p: dict[str, Tensor], tag: str) -> Tensor:
    """Second-moment std of a Gaussian-family kernel; the equivalent std of a sinc."""
    omega = p[f"{tag}_omega_c"]
    sinc = sinc_equivalent_sigma(omega.clamp(min=1e-6))
    return torch.where(omega > 0, sinc, p[f"{tag}_std"]) * p[f"{tag}_applied"].to(omega.dtype)


def blur_std_lr(p: dict[str, Tensor], scale: int) -> Tensor:
    """Effective blur std of the chain in LR pixels (see module docstring)."""
    var = _kernel_std(p, "blur1") ** 2
    var = var + (_kernel_std(p, "blur2") / p["resize1_scale"]) ** 2
    sinc = (sinc_equivalent_sigma(p["final_omega_c"].clamp(min=1e-6)) * scale) ** 2
    var = var + torch.where(p["final_sinc"].bool(), sinc, torch.zeros_like(sinc))
    coarsest = torch.minimum(p["resize1_scale"].clamp(max=1.0), p["resize2_scale"] / scale)
    var = var + _box_var(torch.clamp(coarsest, max=1.0 / scale))
    return var.sqrt() / scale


def _attenuation(p: dict[str, Tensor], scale: int) -> tuple[Tensor, Tensor]:
    """How much the LR's resampling shrinks round-1 and round-2 noise/JPEG artefacts.

    Round 1 acts at resolution ``s1`` (relative to HR) and is seen at ``1/scale``: averaged down by
    ``k1 = s1·scale``. Round 2 acts at ``s2/scale``: ``k2 = max(1, s2)`` (an up-resize then shrinks
    it back). Artefacts added at the LR size are seen as they are.
    """
    k1 = (p["resize1_scale"] * scale).clamp(min=1.0)
    k2 = p["resize2_scale"].clamp(min=1.0)
    return k1, k2


def noise_std(p: dict[str, Tensor], scale: int) -> Tensor:
    """Visible noise std in 1/255 units: both rounds, each over its attenuation, in quadrature."""
    def one(k: str) -> Tensor:
        return torch.where(p[f"noise{k}_gaussian"].bool(), p[f"noise{k}_sigma"],
                           p[f"noise{k}_poisson_scale"] * POISSON_SIGMA_PER_SCALE)
    k1, k2 = _attenuation(p, scale)
    return torch.sqrt((one("1") / k1) ** 2 + (one("2") / k2) ** 2)


def jpeg_strength(p: dict[str, Tensor], scale: int, q_worst: float) -> Tensor:
    """The stronger visible JPEG: (100 - q)/(100 - q_worst) per JPEG, over its attenuation."""
    k1, k2 = _attenuation(p, scale)
    span = max(100.0 - q_worst, 1e-6)  # quality ranges of [100, 100]: no JPEG, strength 0
    j1 = (100.0 - p["jpeg1_quality"]) / span / k1
    k_final = torch.where(p["final_jpeg_first"].bool(), k2, torch.ones_like(k2))
    j2 = (100.0 - p["jpeg2_quality"]) / span / k_final
    return torch.maximum(j1, j2).clamp(0, 1)


def score_bounds(cfg) -> dict[str, float]:
    """Clean and worst-case values of the blur std and the noise/JPEG terms for a preset."""
    s, r1, r2, f = cfg.scale, cfg.first, cfg.second, cfg
    sinc_worst = math.sqrt(2 * math.log(2)) / (math.pi / 5)
    worst1 = max(r1.blur_sigma[1], sinc_worst if r1.sinc_prob > 0 else 0.0)
    worst2 = max(r2.blur_sigma[1], sinc_worst if r2.sinc_prob > 0 else 0.0)
    final = (math.sqrt(2 * math.log(2)) / (math.pi / 3) * s) if f.final_sinc_prob > 0 else 0.0
    s1_min = min(r1.resize_range[0], 1.0)
    coarsest = min(s1_min, r2.resize_range[0] / s, 1.0 / s)
    var = worst1 ** 2 + (worst2 / s1_min) ** 2 + final ** 2 + _box_var(coarsest)
    k1_min = max(1.0, s1_min * s)
    noise_max = math.hypot(
        max(r1.noise_sigma[1], r1.poisson_scale[1] * POISSON_SIGMA_PER_SCALE) / k1_min,
        max(r2.noise_sigma[1], r2.poisson_scale[1] * POISSON_SIGMA_PER_SCALE))
    return {"blur_clean": math.sqrt(_box_var(1.0 / s)) / s, "blur_worst": math.sqrt(var) / s,
            "noise_worst": noise_max,
            "jpeg_worst": min(r1.jpeg_quality[0], r2.jpeg_quality[0])}


def degradation_scores(p: dict[str, Tensor], cfg) -> Tensor:
    """(B, 2) scores [blur, noise] in [0, 1]; clean samples score 0."""
    b = score_bounds(cfg)
    blur = (blur_std_lr(p, cfg.scale) - b["blur_clean"]) / (b["blur_worst"] - b["blur_clean"])
    a = (noise_std(p, cfg.scale) / max(b["noise_worst"], 1e-12)).clamp(0, 1)  # no noise: 0
    noise = (a + jpeg_strength(p, cfg.scale, b["jpeg_worst"])) / 2
    scores = torch.stack([blur.clamp(0, 1), noise], dim=1)
    return torch.where(p["clean"].bool().view(-1, 1), torch.zeros_like(scores), scores)
