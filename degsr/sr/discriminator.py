"""Vision-aided GAN discriminator of Stage 2 (METHOD.md, "Stage 2"; Kumari et al. 2022).

A frozen ViT (DINO ViT-B/16 in the reference) looks at the image; small spectral-normed heads,
the only trainable part, turn three of its feature levels into logits:

- input in [-1, 1] -> DiffAugment (``disc.diffaug``) -> ``x * 0.5 + 0.5`` -> area resize to
  ``input_size``² -> mean/std normalisation -> ViT;
- levels (``disc.levels``, 1-based blocks, default 5, 9, 12 = the reference's
  ``get_intermediate_layers(x, n=8)`` indices 0, 4, -1), each passed through the ViT's final
  LayerNorm as DINO's ``get_intermediate_layers`` does;
- every level but the last: patch tokens as a (C, g, g) grid -> blur(4x4 binomial, stride 1)
  -> SN conv3x3 stride 2 -> LeakyReLU(0.2) -> blur -> SN conv1x1 stride 2 -> a logit map
  (3 x 3 for a 14 x 14 grid); the last level: CLS token -> SN linear -> LeakyReLU(0.2) -> SN
  linear -> one logit (the reference's ``MultiLevelDViT`` with ``down=2``, width 128);
- loss (``multilevel_sigmoid_s``): per level the mean BCE-with-logits, summed over levels; real
  target ``real_label`` (0.8), fake target 0; the generator's non-saturating loss targets
  ``real_label`` too. :meth:`VisionAidedDiscriminator.loss_d` sums the real and the fake term; the
  stage multiplies the sum by ``sr.gan_weight`` (0.5 each, the reference's weights) and takes
  one clipped step on it (the reference takes two, real then fake: under AdamW not the same
  update; README, "Differences from the reference implementation").

No gradient leak (the reference's issue #25: its generator step back-propagates the GAN loss into
the heads and only ``zero_grad`` hides it when gradients are not accumulated): the G step runs
inside :meth:`VisionAidedDiscriminator.frozen_heads`, which switches the heads' ``requires_grad``
off, so gradients reach only the generator's output; :meth:`loss_d` detaches its inputs.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from degsr.errors import UserError
from degsr.sr.config import DiscConfig
from degsr.sr.diffaug import diff_augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# vision-aided-gan's DINO wrapper normalises with CLIP's mean and ImageNet's std
REFERENCE_MEAN = (0.48145466, 0.4578275, 0.40821073)

# facebook/dino-vitb16 (the DINO ViT-B/16 of the reference), random weights
DINO_VITB16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, patch_size=16, image_size=224, hidden_act="gelu",
                   layer_norm_eps=1e-6, qkv_bias=True)
TINY_VIT = dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64,
                patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
MIN_GRID = 4  # patch grid the conv heads need (15 -> 7 -> 6 -> 3 at 14; 5 -> 2 -> 1 -> 1 at 4)


# ------------------------------------------------------------------------------------------------
# backbone
# ------------------------------------------------------------------------------------------------

def _vit_config(**kw):
    from transformers import ViTConfig
    return ViTConfig(**kw)


def _vit(config):
    from transformers import ViTModel
    return ViTModel(config, add_pooling_layer=False)


def save_tiny_backbone(folder, image_size: int = 64, seed: int = 0, **overrides) -> Path:
    """Write a tiny random ViT (``TINY_VIT``, 12 blocks so the default levels apply) to ``folder``
    with ``save_pretrained``, loadable by :func:`load_backbone`; returns the folder."""
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _vit(_vit_config(**{**TINY_VIT, "image_size": image_size, **overrides}))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def load_backbone(folder) -> nn.Module:
    """A transformers ViT (``model_type: vit``, e.g. facebook/dino-vitb16) from a local folder.

    UserError (one line, naming the folder) when it is missing, holds no config, holds another
    model type, or weights that are damaged or lack tensors.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"disc.backbone: folder not found: {folder}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"disc.backbone: {folder} is not a transformers model folder "
                        "(no config.json)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise UserError(f"disc.backbone: cannot read {cfg_file}: {exc}") from None
    if model_type != "vit":
        raise UserError(f"disc.backbone: {folder} holds a {model_type!r} model; expected a ViT "
                        "(model_type 'vit', e.g. facebook/dino-vitb16)")
    from transformers import ViTModel

    from degsr.sr.components import load_local
    # as the base model's folder: damaged weights files, missing tensors: one line; quiet
    return load_local("", path, ViTModel.from_pretrained, True, key="disc.backbone",
                      add_pooling_layer=False)


def build_backbone(cfg: DiscConfig) -> nn.Module:
    """The frozen ViT: loaded from ``cfg.backbone``, else ``cfg.arch`` with random weights."""
    if cfg.backbone:
        return load_backbone(cfg.backbone)
    if cfg.arch == "dino-vitb16":
        return _vit(_vit_config(**DINO_VITB16))
    if cfg.arch == "tiny":
        return _vit(_vit_config(**{**TINY_VIT, "image_size": cfg.input_size}))
    raise UserError(f"disc.arch: must be one of ['tiny', 'dino-vitb16'], got {cfg.arch!r}")


# ------------------------------------------------------------------------------------------------
# heads
# ------------------------------------------------------------------------------------------------

class Blur(nn.Module):
    """Fixed 4x4 binomial ([1, 3, 3, 1] outer product) depthwise blur, zero padding, stride 1."""

    def __init__(self, pad: int):
        super().__init__()
        a = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = a[:, None] * a[None, :]
        self.register_buffer("kernel", (k / k.sum())[None, None], persistent=False)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        k = self.kernel.to(x.dtype).expand(c, 1, 4, 4)
        return F.conv2d(F.pad(x, [self.pad] * 4), k, groups=c)


def grid_head(in_ch: int, width: int) -> nn.Sequential:
    """Patch-token grid -> logit map (the reference's conv branch with ``down=2``)."""
    return nn.Sequential(
        Blur(pad=2),
        spectral_norm(nn.Conv2d(in_ch, width, kernel_size=3, stride=2, padding=0)),
        nn.LeakyReLU(0.2),
        Blur(pad=1),
        spectral_norm(nn.Conv2d(width, 1, kernel_size=1, stride=2)),
    )


def token_head(in_ch: int, width: int) -> nn.Sequential:
    """CLS token -> one logit."""
    return nn.Sequential(
        spectral_norm(nn.Linear(in_ch, width)),
        nn.LeakyReLU(0.2),
        spectral_norm(nn.Linear(width, 1)),
    )


def bce_levels(logits: List[torch.Tensor], target: float) -> torch.Tensor:
    """``multilevel_sigmoid``: per level the mean BCE-with-logits toward ``target``, summed."""
    total = logits[0].new_zeros(())
    for lg in logits:
        total = total + F.binary_cross_entropy_with_logits(lg, torch.full_like(lg, target))
    return total


# ------------------------------------------------------------------------------------------------
# discriminator
# ------------------------------------------------------------------------------------------------

class VisionAidedDiscriminator(nn.Module):
    """Frozen ViT + trainable spectral-normed multi-level heads; see the module docstring.

    Optimise :meth:`head_parameters` only. The backbone stays in eval mode and frozen whatever
    ``train()`` / ``requires_grad_()`` are called with.
    """

    def __init__(self, backbone: nn.Module, cfg: DiscConfig):
        super().__init__()
        problems = cfg.problems()
        if problems:
            raise UserError("disc." + problems[0])
        vcfg = backbone.config
        depth, patch, hidden = vcfg.num_hidden_layers, vcfg.patch_size, vcfg.hidden_size
        if max(cfg.levels) > depth:
            raise UserError(f"disc.levels: block {max(cfg.levels)} does not exist, the backbone "
                            f"has {depth} blocks (got {list(cfg.levels)})")
        if cfg.input_size % patch or cfg.input_size // patch < MIN_GRID:
            raise UserError(f"disc.input_size: must be a multiple of the patch size {patch} and "
                            f"at least {MIN_GRID * patch}, got {cfg.input_size}")
        self.cfg = cfg
        self.levels = list(cfg.levels)
        self.input_size = int(cfg.input_size)
        self.policy = cfg.diffaug
        self.real_label = float(cfg.real_label)
        self.grid = cfg.input_size // patch
        self.interpolate_pos = cfg.input_size != vcfg.image_size
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        mean = REFERENCE_MEAN if cfg.norm == "reference" else IMAGENET_MEAN
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)
        heads = [grid_head(hidden, cfg.head_channels) for _ in self.levels[:-1]]
        heads.append(token_head(hidden, cfg.head_channels))
        self.heads = nn.ModuleList(heads)

    # -- modes and parameters ------------------------------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True):
        self.heads.requires_grad_(requires_grad)
        self.backbone.requires_grad_(False)
        return self

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters (the discriminator optimiser's)."""
        return self.heads.parameters()

    @contextlib.contextmanager
    def frozen_heads(self):
        """Heads' ``requires_grad`` off inside (the generator step), restored on exit."""
        params = list(self.heads.parameters())
        saved = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            yield self
        finally:
            for p, flag in zip(params, saved):
                p.requires_grad_(flag)

    # -- forward -------------------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Backbone features of already augmented [-1, 1] images: (B, C, g, g) grids for all
        levels but the last, (B, C) CLS for the last."""
        x = x.float() * 0.5 + 0.5
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        x = (x - self.mean) / self.std
        x = x.to(self.backbone.dtype)
        grad = torch.is_grad_enabled() and x.requires_grad
        with torch.set_grad_enabled(grad):
            out = self.backbone(pixel_values=x, output_hidden_states=True,
                                interpolate_pos_encoding=self.interpolate_pos)
            hs = out.hidden_states  # [embeddings, block 1, ..., block n]
            norm = self.backbone.layernorm
            feats = []
            for i, level in enumerate(self.levels):
                h = norm(hs[level]).float()
                if i < len(self.levels) - 1:
                    b, _, c = h.shape
                    feats.append(h[:, 1:].transpose(1, 2).reshape(b, c, self.grid, self.grid))
                else:
                    feats.append(h[:, 0])
        return feats

    def logits(self, x: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """Per-level logits of [-1, 1] images (DiffAugment first): (B, h, w) maps, then (B, 1)."""
        x = diff_augment(x, self.policy, generator)
        out = []
        for head, f in zip(self.heads, self.features(x)):
            lg = head(f)
            out.append(lg.squeeze(1) if lg.dim() == 4 else lg)
        return out

    forward = logits

    # -- losses --------------------------------------------------------------------------------

    def loss_d(self, real: torch.Tensor, fake: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """BCE(real -> real_label) + BCE(fake -> 0), each summed over levels; the caller weights
        the sum (``sr.gan_weight``, 0.5: each step weighted 0.5 as the reference's).

        Both inputs are detached (no gradient reaches the generator) and evaluated in one batch,
        ``torch.cat([real, fake])``, each sample augmented independently.
        """
        n = real.shape[0]
        both = torch.cat([real.detach(), fake.detach().to(real.dtype)])
        lg = self.logits(both, generator)
        with torch.no_grad():  # mean D(x) over levels, for logging: how sure the critic is
            prob = torch.stack([torch.sigmoid(t.float()).flatten(1).mean(1) for t in lg]).mean(0)
            self.last_outputs = {"d_real": prob[:n].mean(), "d_fake": prob[n:].mean()}
        return (bce_levels([t[:n] for t in lg], self.real_label)
                + bce_levels([t[n:] for t in lg], 0.0))

    def loss_g(self, fake: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Non-saturating generator loss: BCE(fake -> real_label) summed over levels. Call it
        inside :meth:`frozen_heads` so that only ``fake`` receives gradients."""
        return bce_levels(self.logits(fake, generator), self.real_label)


def build_discriminator(cfg: DiscConfig) -> VisionAidedDiscriminator:
    """The discriminator of ``cfg`` (``disc.*``): backbone per :func:`build_backbone`."""
    return VisionAidedDiscriminator(build_backbone(cfg), cfg)
