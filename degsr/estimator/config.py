"""Shape of the degradation-estimator network (METHOD.md, "Stage 1").

Defaults reproduce MM-RealSR's ``DEResNet`` as S3Diff uses it (``num_feats [64, 64, 64, 128]``,
``num_blocks [2, 2, 2, 2]``, ``downscales [1, 1, 2, 1]``): 2,351,362 parameters for both branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from degsr.config.fields import plain, positive


@dataclass
class EstimatorNetConfig:
    """Two independent ResNet-without-BN branches (blur, noise), each ending in a sigmoid score."""

    in_channels: int = positive(3, "input channels (RGB)")
    widths: List[int] = plain([64, 64, 64, 128], "channels of each stage of residual blocks")
    blocks_per_stage: int = positive(2, "residual blocks (conv-ReLU-conv + identity) per stage")
    downscales: List[int] = plain([1, 1, 2, 1], "per stage: 2 = a stride-2 conv after its blocks, "
                                  "1 = none (a stride-1 conv only where the width changes)")
    head_hidden: int = positive(512, "hidden units of each score head (Linear-ReLU-Linear-sigmoid)")

    def check(self):
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            yield "widths", f"must be a non-empty list of positive integers, got {list(self.widths)}"
        if len(self.downscales) != len(self.widths):
            yield "downscales", (f"must list one factor per stage ({len(self.widths)}), "
                                 f"got {len(self.downscales)}")
        if any(d not in (1, 2) for d in self.downscales):
            yield "downscales", f"each factor must be 1 or 2, got {list(self.downscales)}"

    def problems(self) -> list[str]:
        """Every failed check, one line each naming its key (for configs built outside the loader)."""
        from dataclasses import fields
        out = [f"{f.name}: {msg}" for f in fields(self)
               if "check" in f.metadata and (msg := f.metadata["check"](getattr(self, f.name)))]
        out += [f"{key}: {msg}" for key, msg in self.check()]
        return out


def tiny_net() -> EstimatorNetConfig:
    """A ~32k-parameter network with the same layout, for tests and smoke runs."""
    return EstimatorNetConfig(widths=[8, 8, 16, 16], blocks_per_stage=1, downscales=[1, 1, 2, 1],
                              head_hidden=32)
