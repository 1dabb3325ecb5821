"""Zeroth-order baselines: MeZO on every weight (zo-full) or on the PEFT module only (zo-peft)."""

from __future__ import annotations

from hyft.methods.base import Method, StepStats, finite
from hyft.tasks.scoring import Encoded


class ZerothOrder(Method):
    name = "zo"

    @property
    def in_place(self) -> bool:
        """MeZO's in-place form (+εz, −2εz, +εz with the update): any module that reads the weights sees
        the perturbation (peft's IA3 vectors, DoRA), and no temporaries; full precision, one direction."""
        c = self.config
        return c.fused and c.zo_q == 1 and c.estimator == "two-sided" and self.engine is not None \
            and self.engine.can_shift

    def update(self, batch: Encoded, step: int) -> StepStats:
        if self.in_place:
            return self.in_place_step(batch, step)
        directions, g, loss = self.estimate(batch)  # loss: L(θ) one-sided, mean of L(θ±εz) two-sided
        if not finite(loss, *(c for _, c in directions)):
            return StepStats(loss=loss, zo_coef=g, skipped=True)
        updates = self.zo_updates(directions, step)
        return StepStats(loss=loss, lr_zo=updates[0].lr, zo_coef=g, zo_updates=updates)

    def in_place_step(self, batch, step: int) -> StepStats:
        assert self.engine is not None
        eps, seed = self.config.eps, self.next_seed()
        self.engine.shift_(seed, +eps)
        plus = self.loss_eval(batch)                                 # L(θ+εz)
        self.engine.shift_(seed, -2 * eps)
        minus = self.loss_eval(batch)                                # L(θ−εz)
        plus, minus = self.global_losses(plus, minus)
        g, loss = (plus - minus) / (2 * eps), (plus + minus) / 2
        shifts = (eps, -2 * eps, eps)
        if not finite(plus, minus, g):                               # θ is still shifted: restore it, no step
            return StepStats(loss=loss, zo_coef=g, zo_updates=[self.restore(seed, step, shifts)], skipped=True)
        update = self.zo_update(seed, g, step, shifts=shifts)        # θ + εz − η (g z + λ θ)
        return StepStats(loss=loss, lr_zo=update.lr, zo_coef=g, zo_updates=[update])
