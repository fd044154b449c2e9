"""The degradation estimator: MM-RealSR's "DEResNet" layout (METHOD.md, "Stage 1").

Per score (blur, noise) an independent branch::

    conv3x3 in->widths[0]
    for each stage i: blocks_per_stage x [conv3x3-ReLU-conv3x3 + identity]   (no BN, no ReLU after +)
                      then, if downscales[i] == 2: conv3x3 stride 2 widths[i]->widths[i+1] (last: same)
                      elif the width changes:      conv3x3 stride 1 widths[i]->widths[i+1]
                      (no activation after these convs)
    global average pool -> Linear(widths[-1], head_hidden) -> ReLU -> Linear(head_hidden, 1) -> sigmoid
    (``head_leak`` > 0: LeakyReLU there; a head whose ReLU units all died predicts one constant)

The parameter names (``conv_first.<b>``, ``body.<b>.<j>``, ``fc_degree.<b>``) follow the reference's
state-dict layout, so its published ``de_net.pth`` maps onto this module key for key.
Input: LR images (B, C, h, w) in [0, 1]; output (B, 2) in [0, 1], columns :data:`SCORES`.
"""

from __future__ import annotations

import torch
from torch import nn

from degsr.errors import UserError
from degsr.estimator.config import EstimatorNetConfig

SCORES = ("blur", "noise")


class ResBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3, plus the identity (no normalisation, no activation after the add)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, 1, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


def _body(cfg: EstimatorNetConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    n = len(cfg.widths)
    for i, (w, d) in enumerate(zip(cfg.widths, cfg.downscales)):
        layers += [ResBlock(w) for _ in range(cfg.blocks_per_stage)]
        nxt = cfg.widths[min(i + 1, n - 1)]
        if d == 2:
            layers.append(nn.Conv2d(w, nxt, 3, 2, 1))
        elif nxt != w:
            layers.append(nn.Conv2d(w, nxt, 3, 1, 1))
    return nn.Sequential(*layers)


def _head(cfg: EstimatorNetConfig) -> nn.Sequential:
    act = nn.LeakyReLU(cfg.head_leak) if cfg.head_leak > 0 else nn.ReLU()
    return nn.Sequential(nn.Linear(cfg.widths[-1], cfg.head_hidden), act,
                         nn.Linear(cfg.head_hidden, 1), nn.Sigmoid())


class DegradationEstimator(nn.Module):
    """Scores an LR image's blur and noise in [0, 1] with two independent branches."""

    def __init__(self, cfg: EstimatorNetConfig):
        super().__init__()
        if not isinstance(cfg, EstimatorNetConfig):  # an OmegaConf node or a plain mapping
            from omegaconf import DictConfig, OmegaConf
            cfg = EstimatorNetConfig(**(OmegaConf.to_container(cfg, resolve=True)
                                        if isinstance(cfg, DictConfig) else dict(cfg)))
        problems = cfg.problems()
        if problems:
            raise UserError("invalid estimator network config: " + "; ".join(problems))
        self.cfg = cfg
        self.conv_first = nn.ModuleList(nn.Conv2d(cfg.in_channels, cfg.widths[0], 3, 1, 1)
                                        for _ in SCORES)
        self.body = nn.ModuleList(_body(cfg) for _ in SCORES)
        self.fc_degree = nn.ModuleList(_head(cfg) for _ in SCORES)
        # Each stride-2 conv halves the map; every one of them must see at least 2 pixels.
        self.min_side = 2 ** sum(1 for d in cfg.downscales if d == 2)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, residual_scale: float = 0.1) -> None:
        """Kaiming-normal weights and zero biases; the convs inside residual blocks scaled by 0.1
        (BasicSR's ResidualBlockNoBN init) and each head's last layer by 0.01 (scores start near
        0.5; unscaled, a branch could start saturated and never move). Scaling *every* layer by
        0.1 left the output flat: a network trained from it kept predicting the mean."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                for conv in m.modules():
                    if isinstance(conv, nn.Conv2d):
                        conv.weight.mul_(residual_scale)
        for head in self.fc_degree:  # start every score at 0.5, far from the sigmoid's flat ends
            head[-2].weight.mul_(0.01)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected a (B, {self.cfg.in_channels}, h, w) batch, "
                             f"got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if min(h, w) < self.min_side:
            raise UserError(f"input of {w}x{h} pixels is too small for the degradation estimator: "
                            f"each side must be at least {self.min_side}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        scores = []
        for stem, body, head in zip(self.conv_first, self.body, self.fc_degree):
            feat = body(stem(x)).mean(dim=(-2, -1))
            scores.append(head(feat))
        return torch.cat(scores, dim=1)

