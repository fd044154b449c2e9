"""DISTS (Ding, Ma, Wang, Simoncelli, TPAMI 2020, "Image Quality Assessment: Unifying Structure
and Texture Similarity") on the plain-torch VGG16 of :mod:`degsr.metrics.lpips`.

    D(x, y) = 1 - sum_k sum_c [ a_kc (2 mx my + c1) / (mx^2 + my^2 + c1)
                                + b_kc (2 sxy + c2) / (sx^2 + sy^2 + c2) ]

over the feature maps k = 0 (the RGB input in [0, 1]) and k = 1..5 (VGG16's relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3 of the ImageNet-normalised input, with each max pool replaced by L2
pooling: a 3 x 3 Hann window, stride 2, torchmetrics' ``L2pooling``); mx, sx^2, sxy are the
spatial mean, variance and covariance of channel c; c1 = c2 = 1e-6; the learned a, b >= 0 are
divided by their joint sum. 0 for identical images, larger is more different. No resizing: the
DISTS authors' demo resizes to a shorter side of 256 first; degsr scores the images as they are.

Weights (neither downloaded here): VGG16 from torchvision's ``vgg16-397923af.pth``, the same file
LPIPS takes (the caller's path); a, b from DISTS' ``weights.pt`` (MIT licence, Keyan Ding), which
torchmetrics ships at ``torchmetrics/functional/image/dists_models/weights.pt`` (keys ``alpha``,
``beta``, shapes (1, 1475, 1, 1)); :func:`default_dists_path` finds it without importing it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from degsr.errors import UserError
from degsr.metrics.lpips import (LPIPS_TAPS, VGG16Features, _load_state_dict, _load_strict,
                                 packaged_file)

__all__ = ["DISTS", "default_dists_path"]

_CHANNELS = (3, 64, 128, 256, 512, 512)  # the input, then the five VGG taps
_POOLS = {4: 64, 9: 128, 16: 256, 23: 512}  # VGG's max pools DISTS replaces: index -> channels
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_C1 = _C2 = 1e-6


def default_dists_path() -> Path:
    """DISTS' ``weights.pt`` (alpha, beta) as shipped inside torchmetrics."""
    return packaged_file([("torchmetrics", "functional/image/dists_models/weights.pt")],
                         "DISTS weights (weights.pt)", "install torchmetrics>=1.6 or pass weights_path")


class DISTS(nn.Module):
    """``forward(x, y) -> (B,)`` DISTS of RGB images in [0, 1], (B, 3, H, W). Frozen, eval mode;
    gradients reach the inputs. Build it with :meth:`from_files` (real DISTS) or :meth:`random`
    (tests: the values are not DISTS)."""

    mean: Tensor
    std: Tensor

    def __init__(self) -> None:
        from torchmetrics.functional.image.dists import L2pooling  # 1.2 s of imports: only here

        super().__init__()
        self.net = VGG16Features()
        self.pools = nn.ModuleDict({str(i): L2pooling(channels=c) for i, c in _POOLS.items()})
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.weights = nn.Module()  # alpha (the means' term) and beta (the covariances')
        for name in ("alpha", "beta"):
            self.weights.register_buffer(name, torch.full((1, sum(_CHANNELS), 1, 1), 0.5 / sum(_CHANNELS)))
        self.weights_source = "uninitialised"
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_files(cls, vgg_path: str | Path | None, weights_path: str | Path | None = None) -> "DISTS":
        """Real DISTS: VGG16 from ``vgg_path`` (as :meth:`LPIPS.from_files`), alpha/beta from
        ``weights_path`` (default: :func:`default_dists_path`)."""
        if vgg_path is None:
            raise UserError("DISTS needs ImageNet VGG16 weights (vgg16-397923af.pth) and none were given")
        model = cls()
        model.net.load_file(vgg_path)
        weights_path = default_dists_path() if weights_path is None else Path(weights_path)
        model.load_weights_file(weights_path)
        model.weights_source = f"vgg={vgg_path} dists={weights_path}"
        return model

    @classmethod
    def random(cls, seed: int = 0) -> "DISTS":
        """Random VGG16 (:meth:`VGG16Features.randomize`) and random positive alpha/beta."""
        model, g = cls(), torch.Generator().manual_seed(int(seed))
        model.net.randomize(g)
        model.weights.alpha.uniform_(0.0, 1.0, generator=g)
        model.weights.beta.uniform_(0.0, 1.0, generator=g)
        model.weights_source = f"random(seed={seed})"
        return model

    def load_weights_file(self, path: str | Path) -> None:
        """alpha/beta from a DISTS ``weights.pt``; UserError naming the file on any problem."""
        path = Path(path)
        sd = {f"weights.{k}": v for k, v in _load_state_dict(path, "DISTS weights").items()}
        _load_strict(self, sd, path, "DISTS weights", only="weights.")
        a, b = self.weights.alpha, self.weights.beta
        if bool((a < 0).any()) or bool((b < 0).any()) or not float(a.sum() + b.sum()) > 0:
            raise UserError(f"{path}: DISTS weights must be non-negative, not all zero")

    def train(self, mode: bool = True) -> "DISTS":  # noqa: ARG002 - always eval
        return super().train(False)

    def features(self, x: Tensor) -> list[Tensor]:
        """The six maps DISTS compares: the input, then VGG16's taps with L2 pooling."""
        h, out = (x - self.mean) / self.std, [x]
        for i, layer in enumerate(self.net.features[:LPIPS_TAPS[-1] + 1]):
            h = self.pools[str(i)](h) if str(i) in self.pools else layer(h)
            if i in LPIPS_TAPS:
                out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DISTS expects two (B, 3, H, W) tensors of equal shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        b = x.shape[0]
        feats = self.features(torch.cat([x, y]).to(self.mean.dtype))
        a, bt = self.weights.alpha, self.weights.beta
        alphas = torch.split(a / (a.sum() + bt.sum()), _CHANNELS, dim=1)
        betas = torch.split(bt / (a.sum() + bt.sum()), _CHANNELS, dim=1)
        score = x.new_zeros(b, dtype=self.mean.dtype)
        for f, a, bt in zip(feats, alphas, betas):  # the paper's texture (means), structure (cov)
            fx, fy = f[:b], f[b:]
            mx, my = fx.mean((2, 3), keepdim=True), fy.mean((2, 3), keepdim=True)
            vx, vy = (fx - mx).square().mean((2, 3), keepdim=True), (fy - my).square().mean((2, 3), keepdim=True)
            cov = (fx * fy).mean((2, 3), keepdim=True) - mx * my
            texture = (2 * mx * my + _C1) / (mx.square() + my.square() + _C1)
            structure = (2 * cov + _C2) / (vx + vy + _C2)
            score = score + (a * texture + bt * structure).sum((1, 2, 3))
        return 1 - score
