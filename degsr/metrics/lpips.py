"""LPIPS (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), version 0.1, "lin" variant on a VGG16 backbone, in plain torch (no torchvision).

    d(x, y) = sum_l  mean_{h,w}  sum_c  w_l[c] * ( f_l(x)[c,h,w]/||f_l(x)[:,h,w]|| - f_l(y)[c,h,w]/||f_l(y)[:,h,w]|| )^2

where f_l are VGG16's relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 outputs of the input after the
LPIPS scaling layer ((x - shift) / scale), the norm is over channels (unit-normalised per pixel) and
w_l >= 0 are the five learned 1x1 "lin" convolutions (no bias).

Inputs are RGB in [-1, 1] (the LPIPS convention); pass ``normalize=True`` for images in [0, 1].

Weights (two parts, neither downloaded by this module):

* VGG16 backbone: torchvision's ImageNet VGG16 weights, ``vgg16-397923af.pth``
  (https://download.pytorch.org/models/vgg16-397923af.pth). This file is *not* shipped with any
  installed package; the caller passes its local path to :meth:`LPIPS.from_files`.
* lin layers: the LPIPS v0.1 VGG linear-layer weights from richzhang/PerceptualSimilarity
  (``lpips/weights/v0.1/vgg.pth``), BSD 2-Clause licence, Copyright (c) 2018 Richard Zhang, Phillip
  Isola, Alexei A. Efros, Eli Shechtman, Oliver Wang. torchmetrics (Apache-2.0 package) ships a
  copy of that file at ``torchmetrics/functional/image/lpips_models/vgg.pth`` (keys
  ``lin{0..4}.model.1.weight``, shapes (1, C, 1, 1)); :func:`default_lin_path` finds it there (or
  in an installed ``lpips`` package, ``lpips/weights/v0.1/vgg.pth``) without importing either.

:meth:`LPIPS.random` builds a model with random weights for tests; its values are not LPIPS.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from degsr.errors import UserError, one_line

__all__ = ["LPIPS", "VGG16Features", "VGG16_CONV_LAYERS", "LPIPS_TAPS", "default_lin_path"]

#: (index in torchvision's ``vgg16().features``, in_channels, out_channels) of every conv layer.
VGG16_CONV_LAYERS: tuple[tuple[int, int, int], ...] = (
    (0, 3, 64), (2, 64, 64),
    (5, 64, 128), (7, 128, 128),
    (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512),
    (24, 512, 512), (26, 512, 512), (28, 512, 512),
)
_MAXPOOL_INDICES = (4, 9, 16, 23, 30)
#: indices of the ReLU modules whose outputs LPIPS uses: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

# LPIPS ScalingLayer constants (ImageNet mean/std expressed for inputs in [-1, 1]).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10  # as in PerceptualSimilarity's normalize_tensor: x / (||x|| + eps)

_VGG_URL_HINT = (
    "pass the path of torchvision's ImageNet VGG16 weights (vgg16-397923af.pth, "
    "https://download.pytorch.org/models/vgg16-397923af.pth)"
)


class VGG16Features(nn.Module):
    """torchvision's ``vgg16().features`` with the same module indices (``features.N.weight``), so a
    torchvision VGG16 state dict loads key for key; ``forward`` returns the five ReLU outputs LPIPS
    uses (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)."""

    def __init__(self) -> None:
        super().__init__()
        convs = {i: (cin, cout) for i, cin, cout in VGG16_CONV_LAYERS}
        layers: list[nn.Module] = []
        for i in range(31):
            if i in convs:
                layers.append(nn.Conv2d(*convs[i], kernel_size=3, padding=1))
            elif i in _MAXPOOL_INDICES:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.ReLU(inplace=False))  # not in-place: taps stay intact for autograd
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        last = LPIPS_TAPS[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                outs.append(x)
                if i == last:
                    break
        return outs

    def randomize(self, g: torch.Generator) -> None:
        """Random weights for tests (torchvision's init: Kaiming-normal, fan_out; plus small
        random biases): the values are not ImageNet's."""
        with torch.no_grad():
            for m in self.features:
                if isinstance(m, nn.Conv2d):
                    fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                    m.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=g)
                    m.bias.uniform_(-0.05, 0.05, generator=g)

    def load_file(self, path: str | Path) -> None:
        """Load torchvision VGG16 weights from ``path``: a full ``vgg16`` state dict (its
        ``features.*`` keys are used, ``classifier.*`` ignored) or a features-only state dict
        (keys ``N.weight`` / ``N.bias``). Raises UserError naming the file on any problem."""
        path = Path(path)
        sd = _load_state_dict(path, "VGG16 weights")
        if any(k.startswith("features.") for k in sd):
            sd = {k: v for k, v in sd.items() if k.startswith("features.")}
        else:
            sd = {f"features.{k}": v for k, v in sd.items()}
        _load_strict(self, sd, path, "VGG16 weights")


class LPIPS(nn.Module):
    """LPIPS v0.1, VGG16 "lin" variant; ``forward(x, y) -> (B,)`` distances, inputs (B, 3, H, W) RGB
    in [-1, 1] (``normalize=True``: in [0, 1]). Always frozen and in eval mode; gradients flow to
    the inputs, so it can serve as a loss.

    Build it with :meth:`from_files` (real LPIPS) or :meth:`random` (tests); the bare constructor
    leaves torch's default initialisation.
    """

    shift: Tensor
    scale: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        #: where the weights came from (for logs): "random(seed=...)" or the file paths.
        self.weights_source = "uninitialised"
        self._freeze()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_files(cls, vgg_path: str | Path | None, lin_path: str | Path | None = None) -> "LPIPS":
        """Real LPIPS: VGG16 from ``vgg_path`` (torchvision's ``vgg16-397923af.pth``, full model or
        features-only state dict) and lin layers from ``lin_path`` (default: :func:`default_lin_path`,
        the BSD-2 PerceptualSimilarity weights shipped inside torchmetrics)."""
        if vgg_path is None:
            raise UserError(f"LPIPS needs ImageNet VGG16 weights and none were given: {_VGG_URL_HINT}")
        model = cls()
        model.net.load_file(vgg_path)
        lin_path = default_lin_path() if lin_path is None else Path(lin_path)
        model.load_lin_file(lin_path)
        model.weights_source = f"vgg={vgg_path} lin={lin_path}"
        return model._freeze()

    @classmethod
    def random(cls, seed: int = 0, lin_path: str | Path | None = None) -> "LPIPS":
        """Random VGG16 weights (torchvision's init: Kaiming-normal, fan_out; plus small random
        biases) from ``seed``; lin weights random non-negative, or loaded from ``lin_path``.
        For tests only: the values are not LPIPS."""
        model = cls()
        g = torch.Generator().manual_seed(int(seed))
        model.net.randomize(g)
        with torch.no_grad():
            for lin in model.lins:
                lin.weight.uniform_(0.0, 2.0 / lin.in_channels, generator=g)
        if lin_path is not None:
            model.load_lin_file(lin_path)
        model.weights_source = f"random(seed={seed})" + (f" lin={lin_path}" if lin_path else "")
        return model._freeze()

    def load_lin_file(self, path: str | Path) -> None:
        """Load the five lin-layer weights (PerceptualSimilarity key format ``lin{k}.model.{j}.weight``,
        or this module's ``lins.{k}.weight``). Raises UserError naming the file on any problem."""
        path = Path(path)
        raw = _load_state_dict(path, "LPIPS lin weights")
        sd = {}
        for k, v in raw.items():
            m = re.fullmatch(r"lin(\d+)\.model\.\d+\.weight", k)
            sd[f"lins.{m.group(1)}.weight" if m else k] = v
        _load_strict(self, sd, path, "LPIPS lin weights", only="lins.")
        if any(bool((lin.weight < 0).any()) for lin in self.lins):
            raise UserError(f"{path}: LPIPS lin weights must be non-negative")

    def _freeze(self) -> "LPIPS":
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "LPIPS":  # noqa: ARG002 - always eval
        """LPIPS never leaves eval mode (it has no dropout/batch-norm, but stays frozen by contract)."""
        return super().train(False)

    # ---- metric -------------------------------------------------------------------------------

    def forward(self, x: Tensor, y: Tensor, normalize: bool = False) -> Tensor:
        """LPIPS distance per image, shape (B,). ``x``, ``y``: (B, 3, H, W) RGB in [-1, 1], or in
        [0, 1] with ``normalize=True``."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B, 3, H, W) tensors of equal shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if normalize:
            x, y = 2 * x - 1, 2 * y - 1
        dtype = self.shift.dtype
        feats = self.net(self._scale(torch.cat([x, y]).to(dtype)))
        b = x.shape[0]
        total = x.new_zeros(b, dtype=dtype)
        for f, lin in zip(feats, self.lins):
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + _NORM_EPS)
            d = (f[:b] - f[b:]).pow(2)
            total = total + lin(d).mean(dim=(1, 2, 3))
        return total

    def _scale(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


def default_lin_path() -> Path:
    """Path of the LPIPS v0.1 VGG lin weights shipped in an installed package: torchmetrics'
    ``torchmetrics/functional/image/lpips_models/vgg.pth`` (copy of PerceptualSimilarity's BSD-2
    ``lpips/weights/v0.1/vgg.pth``), else the ``lpips`` package's own ``lpips/weights/v0.1/vgg.pth``.
    Neither package is imported. Raises UserError when neither is installed."""
    return packaged_file([("torchmetrics", "functional/image/lpips_models/vgg.pth"),
                          ("lpips", "weights/v0.1/vgg.pth")], "LPIPS lin weights (vgg.pth)",
                         "install torchmetrics or pass lin_path")


def packaged_file(candidates: list[tuple[str, str]], what: str, hint: str) -> Path:
    """The first existing ``(package, path inside it)`` of ``candidates``, found without
    importing the package; UserError naming every place looked at (and ``hint``) otherwise."""
    looked = []
    for pkg, rel in candidates:
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                p = Path(loc) / rel
                looked.append(p)
                if p.is_file():
                    return p
    where = ", ".join(str(p) for p in looked) or f"no {' or '.join(c[0] for c in candidates)} installed"
    raise UserError(f"{what} not found (looked at: {where}); {hint}")


def _load_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / not a torch file / pickled code
        raise UserError(f"{path}: not a readable {what} file, not one torch.save wrote "
                        f"({type(e).__name__}: {one_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{path}: {what} file does not hold a state dict of tensors")
    return obj


def _load_strict(module: nn.Module, sd: dict[str, Tensor], path: Path, what: str,
                 only: str = "") -> None:
    """Strict load of ``sd`` into ``module``'s keys starting with ``only`` (all keys by default);
    one-line UserError naming ``path`` for missing/unexpected keys or wrong shapes."""
    own = {k: v for k, v in module.state_dict().items() if k.startswith(only)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}")
        raise UserError(f"{path}: {what} do not match ({'; '.join(parts)})")
    bad = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise UserError(f"{path}: {what} have wrong shapes ({'; '.join(bad[:3])})")
    with torch.no_grad():
        params = dict(module.named_parameters()) | dict(module.named_buffers())
        for k, v in sd.items():
            params[k].copy_(v)
