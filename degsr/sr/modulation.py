"""Degradation-guided modulation: scores ``d`` -> one r x r matrix ``C`` per block and sample.

METHOD.md, "Stage 2", with the reference S3Diff layout (``src/s3diff.py``):

- random Fourier features: a fixed vector ``W ~ N(0, 1)`` of ``fourier_dim`` frequencies (a
  persistent buffer: saved with the model, never trained), ``p = 2 pi d W`` -> ``(B, 2, F)``,
  ``e = [sin p_blur, cos p_blur, sin p_noise, cos p_noise]`` -> ``(B, 4F)`` (the reference order);
- per network (VAE encoder, UNet): ``h = ReLU(Linear(4F, mlp_dim)(e))``;
- per block id: a learned embedding -> ``ReLU(Linear(block_embed_dim, block_embed_dim))``;
- fuse: ``Linear(mlp_dim + block_embed_dim, r * r)`` on ``[h, block]`` -> ``C``
  ``(B, blocks, r, r)``.

Every Linear of the three MLPs starts as Kaiming-normal x 1e-5 with zero bias (the reference's
``default_init_weights(..., 1e-5)``); the block embeddings keep ``nn.Embedding``'s N(0, 1).

``C`` is laid out as the reference's ``de_mod``: the LoRA layer computes ``a @ C`` on row vectors
``a = A x``, i.e. ``C^T (A x)`` on column vectors, so a reference checkpoint gives the same ``C``.

Block ids (names relative to the adapted module; a leading ``encoder.`` is ignored for the VAE):

- VAE encoder, 6 ids: ``down_blocks.i`` -> i (0-3), ``mid_block`` -> 4, anything else
  (``conv_in``, ``conv_out``) -> 5.
- UNet, 10 ids: ``down_blocks.i`` -> i (0-3), ``mid_block`` -> 4, ``up_blocks.i`` -> 5 + i,
  anything else -> 9 (with the default targets that is only ``conv_out``; the UNet ``conv_in`` is
  trained fully, not LoRA'd, so it has no id).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from degsr.sr.config import LoraConfig

VAE_BLOCKS = 6
UNET_BLOCKS = 10
INIT_SCALE = 1e-5


def _block_index(parts: list[str], key: str) -> int | None:
    if key in parts:
        i = parts.index(key)
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def vae_block_id(name: str) -> int:
    """Block id (0-5) of a VAE-encoder module name, e.g. ``down_blocks.2.resnets.0.conv1`` -> 2."""
    parts = name.split(".")
    if parts and parts[0] == "encoder":
        parts = parts[1:]
    if parts and parts[0] == "down_blocks":
        i = _block_index(parts, "down_blocks")
        if i is None or not 0 <= i < 4:
            raise ValueError(f"VAE down block index out of 0-3 in {name!r}")
        return i
    if parts and parts[0] == "mid_block":
        return 4
    return 5


def unet_block_id(name: str) -> int:
    """Block id (0-9) of a UNet module name, e.g. ``up_blocks.1.attentions.0.proj_in`` -> 6."""
    parts = name.split(".")
    head = parts[0] if parts else ""
    if head in ("down_blocks", "up_blocks"):
        i = _block_index(parts, head)
        if i is None or not 0 <= i < 4:
            raise ValueError(f"UNet block index out of 0-3 in {name!r}")
        return i if head == "down_blocks" else 5 + i
    if head == "mid_block":
        return 4
    return 9


def _small_init(module: nn.Module, scale: float = INIT_SCALE) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            with torch.no_grad():
                m.weight.mul_(scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class FourierFeatures(nn.Module):
    """``d (B, S)`` in [0, 1] -> ``[sin 2 pi d_s W, cos 2 pi d_s W]`` per score s: ``(B, 2SF)``."""

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("W", torch.randn(dim, generator=g, device="cpu"), persistent=True)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        if d.dim() != 2:
            raise ValueError(f"degradation scores must be (B, scores), got shape {tuple(d.shape)}")
        # float32 at least: p reaches ~20 rad, where bf16 would be off by ~0.1
        dtype = torch.promote_types(self.W.dtype, torch.float32)
        p = 2 * math.pi * d.to(dtype)[..., None] * self.W.to(dtype)       # (B, S, F)
        e = torch.cat([torch.sin(p), torch.cos(p)], dim=-1)               # (B, S, 2F)
        return e.flatten(1)                                               # (B, 2 S F)


class BlockModulation(nn.Module):
    """One network's generator of ``C``: degradation MLP + block embeddings + fuse layer."""

    def __init__(self, in_dim: int, num_blocks: int, rank: int, mlp_dim: int = 256,
                 block_embed_dim: int = 64):
        super().__init__()
        self.num_blocks, self.rank = num_blocks, rank
        self.deg_mlp = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU())
        self.block_embeddings = nn.Embedding(num_blocks, block_embed_dim)
        self.block_mlp = nn.Sequential(nn.Linear(block_embed_dim, block_embed_dim), nn.ReLU())
        self.fuse = nn.Linear(mlp_dim + block_embed_dim, rank * rank)
        for m in (self.deg_mlp, self.block_mlp, self.fuse):
            _small_init(m)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """Fourier features ``(B, in_dim)`` -> ``C (B, num_blocks, r, r)``."""
        h = self.deg_mlp(e.to(self.fuse.weight.dtype))                    # (B, mlp)
        blocks = self.block_mlp(self.block_embeddings.weight)             # (N, emb)
        b, n = h.shape[0], blocks.shape[0]
        x = torch.cat([h[:, None].expand(b, n, -1), blocks[None].expand(b, n, -1)], dim=-1)
        return self.fuse(x).reshape(b, n, self.rank, self.rank)


class DegradationModulation(nn.Module):
    """Both networks' modulation: ``d (B, 2)`` -> ``(C_vae (B, 6, rv, rv), C_unet (B, 10, ru, ru))``
    (``rv``, ``ru``: the VAE and UNet ranks).

    Pass ``C_vae`` / ``C_unet`` to :func:`degsr.sr.lora.set_modulation` (or ``merged``) of the VAE
    encoder / UNet: block id ``k`` uses ``C[:, k]``.
    """

    def __init__(self, cfg: LoraConfig | None = None, *, seed: int = 0, num_scores: int = 2):
        super().__init__()
        cfg = cfg or LoraConfig()
        self.fourier = FourierFeatures(cfg.fourier_dim, seed)
        in_dim = 2 * num_scores * cfg.fourier_dim
        self.vae = BlockModulation(in_dim, VAE_BLOCKS, cfg.vae_rank, cfg.mlp_dim,
                                   cfg.block_embed_dim)
        self.unet = BlockModulation(in_dim, UNET_BLOCKS, cfg.unet_rank, cfg.mlp_dim,
                                    cfg.block_embed_dim)

    def forward(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.fourier(d)
        return self.vae(e), self.unet(e)
