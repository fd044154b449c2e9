"""Shape of the degradation-estimator network (METHOD.md, "Stage 1").

Defaults reproduce MM-RealSR's ``DEResNet`` as S3Diff uses it (``num_feats [64, 64, 64, 128]``,
``num_blocks [2, 2, 2, 2]``, ``downscales [1, 1, 2, 1]``): 2,351,362 parameters for both branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from degsr.config.fields import Checked, choice, number, plain, positive


@dataclass
class EstimatorNetConfig(Checked):
    """Two independent ResNet-without-BN branches (blur, noise), each ending in a sigmoid score."""

    in_channels: int = positive(3, "input channels (RGB)")
    widths: List[int] = plain([64, 64, 64, 128], "channels of each stage of residual blocks")
    blocks_per_stage: int = positive(2, "residual blocks (conv-ReLU-conv + identity) per stage")
    downscales: List[int] = plain([1, 1, 2, 1], "per stage: 2 = a stride-2 conv after its blocks, "
                                  "1 = none (a stride-1 conv only where the width changes)")
    head_hidden: int = positive(512, "hidden units of each score head (Linear-ReLU-Linear-sigmoid)")
    head_leak: float = number(0.0, "negative slope of the heads' hidden activation: 0 = ReLU (the "
                                   "reference); > 0 = LeakyReLU, whose units cannot all die (no "
                                   "weights either way: the state dict is the same)", lo=0, hi=1)

    def check(self):
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            yield "widths", f"must be a non-empty list of positive integers, got {list(self.widths)}"
        if len(self.downscales) != len(self.widths):
            yield "downscales", (f"must list one factor per stage ({len(self.widths)}), "
                                 f"got {len(self.downscales)}")
        if any(d not in (1, 2) for d in self.downscales):
            yield "downscales", f"each factor must be 1 or 2, got {list(self.downscales)}"



def tiny_net() -> EstimatorNetConfig:
    """A ~32k-parameter network with the same layout, for tests and smoke runs."""
    return EstimatorNetConfig(widths=[8, 8, 16, 16], blocks_per_stage=1, downscales=[1, 1, 2, 1],
                              head_hidden=32)


OBJECTIVES = ["supervised", "ranking", "both"]


@dataclass
class EstimatorConfig(Checked):
    """Stage 1: training the estimator (``estimator.*`` keys).

    ``supervised`` regresses the engine's scores; ``ranking`` is MM-RealSR's objective: pairs of
    the same crop differing only in the blur draws (or only in the noise+JPEG draws), a
    margin-ranking loss on each pair, plus anchors (clean -> 0, worst case of the preset -> its
    label: 1 under the modelled labels, what it measures under the measured ones).
    MM-RealSR weighs ranking 0.01 and anchors 1e-4 next to an SR loss; alone, only their ratio
    matters, kept here as 1 : 0.01.
    """

    net: EstimatorNetConfig = field(default_factory=EstimatorNetConfig)
    objective: str = choice("supervised", OBJECTIVES, "training objective (an ablation)")
    supervised_weight: float = number(1.0, "weight of the MSE to the engine's scores", lo=0)
    within_crop_weight: float = number(
        0.0, "weight of the within-crop MSE: the predicted scores of the degradations of one crop "
             "(data.degradations_per_crop >= 2), each relative to their mean, regressed on the "
             "same for the engine's scores", lo=0)
    ranking_weight: float = number(1.0, "weight of the margin-ranking loss", lo=0)
    anchor_weight: float = number(0.01, "weight of the clean->0 / worst-case->its-label anchors "
                                        "(MSE)", lo=0)
    margin: float = number(0.05, "ranking margin", lo=0)
    min_gap: float = number(0.05, "pairs whose engine scores differ by less are not ranked", lo=0)
    lr: float = positive(2e-4, "AdamW learning rate")
    weight_decay: float = number(0.0, "AdamW weight decay", lo=0)
    lr_schedule: str = choice("constant", ["constant", "cosine"],
                              "learning rate over the run: constant, or cosine decay to 0 at "
                              "trainer.max_steps (after the warm-up)")
    warmup_steps: int = number(0, "steps of linear warm-up from 0 to lr", lo=0)
    ema_decay: float = number(0.0, "exponential moving average of the weights (Lightning's "
                                   "EMAWeightAveraging), updated every step with this decay; "
                                   "validation, checkpoints' state_dict and the export use the "
                                   "average (0.999: about the last 1000 steps). 0 = off",
                               lo=0, hi=0.99999)
