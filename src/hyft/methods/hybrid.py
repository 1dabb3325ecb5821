"""The hybrid step: ZO (SPSA) on the base model θ, FO (backprop) on the PEFT module φ, own learning rates."""

from __future__ import annotations

from collections.abc import Sequence

from hyft.methods.base import Method, StepStats, finite
from hyft.tasks.base import Example


class Hybrid(Method):
    name = "hybrid"

    def step(self, examples: Sequence[Example], step: int) -> StepStats:
        batch = self.objective.encode(examples)
        seed = self.next_seed()                                  # z ~ N(0, I) is regenerated from this seed
        loss = self.loss_with_grad(batch).item()                 # L(θ, φ; B), ∇φ by backprop (no grad for θ)
        g, _ = self.spsa(batch, seed, loss0=loss)                # g = (L(θ+εz) − L(θ−εz)) / 2ε  (or one-sided)
        if not finite(loss, g):
            self.discard_grads()
            return StepStats(loss=loss, zo_coef=g, skipped=True)
        lr_fo = self.fo_update(step)                             # φ ← φ − η_fo ∇φ L
        update = self.zo_update(seed, g, step)                   # θ ← θ − η_zo (g z + λ θ)
        return StepStats(loss=loss, lr_fo=lr_fo, lr_zo=update.lr, zo_coef=g, zo_update=update)
