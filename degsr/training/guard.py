"""Non-finite losses: every rank agrees before an optimiser step, the step is skipped everywhere.

A NaN/inf loss on one rank would put NaN into every rank's weights through the gradient
all-reduce. :meth:`NonFiniteGuard.skip` all-reduces a "bad" flag first (one float per batch), so
all ranks take the same decision. The caller then drops the step's gradients on every rank
(``zero_grad(set_to_none=True)``) and still calls the optimiser: AdamW leaves a parameter without
a gradient untouched (no moment update, no weight decay), so weights and optimiser state stay as
they were, while the step is counted like any other (``global_step`` and the LR schedule move on
alike on every rank). Skips are counted (``train/skipped_steps``); after ``limit`` consecutive
skips training stops with a UserError, since the run has diverged and more skipping only burns
compute.
"""

from __future__ import annotations

import torch

from degsr.errors import UserError


class NonFiniteGuard:
    def __init__(self, limit: int = 20):
        self.limit = int(limit)
        self.skipped = 0  # over the run
        self.consecutive = 0

    def skip(self, module, *losses: torch.Tensor, what: str = "loss") -> bool:
        """True (on every rank) when any rank's ``losses`` hold a NaN or inf."""
        bad = torch.stack([~torch.isfinite(x.detach()).all() for x in losses]).any().float()
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if float(bad) == 0:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        step = module.global_step
        if self.consecutive >= self.limit:
            raise UserError(
                f"stopping at step {step}: the {what} was NaN/inf on some rank for {self.consecutive} "
                f"steps in a row (trainer.max_nonfinite_skips={self.limit}); the run diverged: "
                f"lower the learning rate or check the data, then resume from the last checkpoint")
        return True

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
