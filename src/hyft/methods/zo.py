"""Zeroth-order baselines: MeZO on every weight (zo-full) or on the PEFT module only (zo-peft)."""

from __future__ import annotations

from collections.abc import Sequence

from hyft.methods.base import Method, StepStats, finite
from hyft.tasks.base import Example


class ZerothOrder(Method):
    name = "zo"

    def step(self, examples: Sequence[Example], step: int) -> StepStats:
        batch = self.objective.encode(examples)
        seed = self.next_seed()
        g, loss = self.spsa(batch, seed)  # loss: L(θ) one-sided, (L(θ+εz) + L(θ−εz)) / 2 two-sided
        if not finite(loss, g):
            return StepStats(loss=loss, zo_coef=g, skipped=True)
        update = self.zo_update(seed, g, step)
        return StepStats(loss=loss, lr_zo=update.lr, zo_coef=g, zo_update=update)
