"""Zeroth-order baselines: MeZO on every weight (zo-full) or on the PEFT module only (zo-peft)."""

from __future__ import annotations

from collections.abc import Sequence

from hyft.methods.base import Method, StepStats, finite
from hyft.tasks.base import Example


class ZerothOrder(Method):
    name = "zo"

    def step(self, examples: Sequence[Example], step: int) -> StepStats:
        batch = self.objective.encode(examples)
        directions, g, loss = self.estimate(batch)  # loss: L(θ) one-sided, mean of L(θ±εz) two-sided
        if not finite(loss, *(c for _, c in directions)):
            return StepStats(loss=loss, zo_coef=g, skipped=True)
        updates = self.zo_updates(directions, step)
        return StepStats(loss=loss, lr_zo=updates[0].lr, zo_coef=g, zo_updates=updates)
