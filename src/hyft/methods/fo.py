"""First-order baselines: backprop on every weight (fo-full) or on the PEFT module only (fo-peft)."""

from __future__ import annotations

from hyft.methods.base import Method, StepStats, finite
from hyft.tasks.scoring import Encoded


class FirstOrder(Method):
    name = "fo"

    def update(self, batch: Encoded, step: int) -> StepStats:
        (loss,) = self.global_losses(self.loss_with_grad(batch).item(), group="fo")
        if not finite(loss):
            self.discard_grads()
            return StepStats(loss=loss, skipped=True)
        return StepStats(loss=loss, lr_fo=self.fo_update(step))
