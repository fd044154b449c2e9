"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

Differentiable, batched augmentations applied to every image the discriminator sees, real and fake
alike, each sample drawing its own parameters (the reference draws them independently for the real
and the fake batch). Images are in [-1, 1], (B, C, H, W). The ops follow the paper / the
vision-aided-gan reference:

- ``color``: brightness ``x + (u - 0.5)``, then saturation ``m_c + 2u (x - m_c)`` (``m_c`` the
  per-pixel channel mean), then contrast ``m + (u + 0.5)(x - m)`` (``m`` the per-image mean); a
  fresh ``u ~ U[0, 1)`` per sample for each of the three;
- ``translation``: an integer shift in [-r, r] per axis with ``r = round(H / 8)``, the uncovered
  border filled with zeros;
- ``cutout``: a zeroed box of ``round(H / 2) x round(W / 2)`` whose centre is uniform over the
  image (clipped at the border, so on average ~19 % of the area is zeroed, at most 25 %).

All randomness comes from ``generator`` (drawn on the generator's device, then moved), so a run is
reproducible given the generator's state; ``None`` uses torch's global RNG on the images' device.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from degsr.errors import UserError

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def _uniform(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One U[0, 1) draw per sample, shaped (B, 1, 1, 1) for broadcasting."""
    dev = generator.device if generator is not None else x.device
    u = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=dev)
    return u.to(device=x.device, dtype=x.dtype)


def _randint(low: int, high: int, n: int, x: torch.Tensor,
             generator: Optional[torch.Generator]) -> torch.Tensor:
    """``n`` integers uniform in [low, high) (high exclusive), on the images' device."""
    dev = generator.device if generator is not None else x.device
    return torch.randint(low, high, (n,), generator=generator, device=dev).to(x.device)


def brightness(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    return x + (_uniform(x, generator) - 0.5)


def saturation(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    m = x.mean(dim=1, keepdim=True)
    return m + (x - m) * (2.0 * _uniform(x, generator))


def contrast(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return m + (x - m) * (_uniform(x, generator) + 0.5)


def _shift(x: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    """out[..., i, ...] = x[..., i + t_b, ...] along ``dim`` (2 or 3), zero where out of range."""
    n = x.shape[dim]
    idx = torch.arange(n, device=x.device)[None, :] + t[:, None]  # (B, n)
    valid = (idx >= 0) & (idx < n)
    idx = idx.clamp(0, n - 1)
    if dim == 2:
        gidx = idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
        keep = valid[:, None, :, None]
    else:
        gidx = idx[:, None, None, :].expand(-1, x.shape[1], x.shape[2], -1)
        keep = valid[:, None, None, :]
    return torch.gather(x, dim, gidx) * keep.to(x.dtype)


def translation(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    b, _, h, w = x.shape
    rh, rw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    th = _randint(-rh, rh + 1, b, x, generator)
    tw = _randint(-rw, rw + 1, b, x, generator)
    return _shift(_shift(x, th, 2), tw, 3)


def cutout_mask(x: torch.Tensor, generator: Optional[torch.Generator] = None,
                ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """(B, 1, H, W) mask, 0 inside each sample's cutout box and 1 elsewhere."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    # centre uniform over [0, H] (even box) or [0, H - 1] (odd box), as the reference
    cy = _randint(0, h + 1 - ch % 2, b, x, generator)
    cx = _randint(0, w + 1 - cw % 2, b, x, generator)
    y0, x0 = cy - ch // 2, cx - cw // 2
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= y0[:, None]) & (ys < (y0 + ch)[:, None])  # (B, H)
    in_x = (xs >= x0[:, None]) & (xs < (x0 + cw)[:, None])  # (B, W)
    inside = in_y[:, :, None] & in_x[:, None, :]
    return (~inside).to(x.dtype)[:, None]


def cutout(x: torch.Tensor, generator: Optional[torch.Generator] = None,
           ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    return x * cutout_mask(x, generator, ratio)


AUGMENTATIONS: Dict[str, List[Callable[..., torch.Tensor]]] = {
    "color": [brightness, saturation, contrast],
    "translation": [translation],
    "cutout": [cutout],
}


def parse_policy(policy: str) -> List[str]:
    """``"color,translation,cutout"`` -> its op names; UserError for an unknown one."""
    ops = [p.strip() for p in (policy or "").split(",") if p.strip()]
    bad = [p for p in ops if p not in AUGMENTATIONS]
    if bad:
        raise UserError(f"disc.diffaug: unknown DiffAugment ops {bad}; choose from "
                        f"{list(AUGMENTATIONS)}")
    return ops


def diff_augment(x: torch.Tensor, policy: str = "color,translation,cutout",
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Apply the policy's ops in order to a (B, C, H, W) batch; ``""`` returns ``x`` unchanged."""
    for op in parse_policy(policy):
        for fn in AUGMENTATIONS[op]:
            x = fn(x, generator)
    return x.contiguous()
