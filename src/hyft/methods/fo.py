"""First-order baselines: backprop on every weight (fo-full) or on the PEFT module only (fo-peft)."""

from __future__ import annotations

from collections.abc import Sequence

from hyft.methods.base import Method, StepStats, finite
from hyft.tasks.base import Example


class FirstOrder(Method):
    name = "fo"

    def step(self, examples: Sequence[Example], step: int) -> StepStats:
        batch = self.objective.encode(examples)
        (loss,) = self.global_losses(self.loss_with_grad(batch).item(), group="fo")
        if not finite(loss):
            self.discard_grads()
            return StepStats(loss=loss, skipped=True)
        return StepStats(loss=loss, lr_fo=self.fo_update(step))
