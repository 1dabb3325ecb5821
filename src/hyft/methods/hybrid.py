"""The hybrid step: ZO (SPSA) on the base model θ, FO (backprop) on the PEFT module φ, own learning rates."""

from __future__ import annotations

from hyft.methods.base import Method, StepStats, finite
from hyft.tasks.scoring import Encoded


class Hybrid(Method):
    name = "hybrid"

    @property
    def fused(self) -> bool:
        """The fused form needs the backward pass to be an SPSA point: one direction, two-sided, no dropout
        (its train-mode loss is the eval-mode loss), and float32 θ (in-place shifts replay exactly)."""
        c = self.config
        return (c.fused and c.zo_q == 1 and c.estimator == "two-sided" and self.engine is not None
                and self.engine.can_shift and self.train_loss_is_eval_loss)

    def update(self, batch: Encoded, step: int) -> StepStats:
        return self.fused_step(batch, step) if self.fused else self.separate_step(batch, step)

    def fused_step(self, batch, step: int) -> StepStats:
        """One fo-peft step at θ+εz, one forward at θ−εz: ∇φ is taken ε away from θ, and no extra forward."""
        assert self.engine is not None
        eps = self.config.eps
        seed = self.next_seed()                                  # z is regenerated from this seed
        self.engine.shift_(seed, +eps)                           # θ + εz, in place
        plus = self.loss_with_grad(batch).item()                 # L(θ+εz, φ; B), ∇φ by backprop
        self.engine.shift_(seed, -2 * eps)                       # θ − εz
        minus = self.loss_eval(batch)                            # L(θ−εz, φ; B)
        plus, minus = self.global_losses(plus, minus)            # over the global batch (data parallel)
        g = (plus - minus) / (2 * eps)
        if not finite(plus, minus, g):                           # θ is still shifted: restore it, no step
            self.discard_grads()
            restore = self.restore(seed, step, shifts=(eps, -2 * eps, eps))
            return StepStats(loss=(plus + minus) / 2, zo_coef=g, zo_updates=[restore], skipped=True)
        lr_fo = self.fo_update(step)                             # φ ← φ − η_fo ∇φ L
        update = self.zo_update(seed, g, step, shifts=(eps, -2 * eps, eps))  # θ ← θ + εz − η_zo (g z + λ θ)
        return StepStats(loss=(plus + minus) / 2, lr_fo=lr_fo, lr_zo=update.lr, zo_coef=g, zo_updates=[update])

    def separate_step(self, batch, step: int) -> StepStats:
        """The paper's order: ∇φ at θ, then q SPSA estimates at (θ, φ), then both updates."""
        loss = self.loss_with_grad(batch).item()                 # L(θ, φ; B), ∇φ by backprop (no grad for θ)
        (loss,) = self.global_losses(loss, group="fo")
        directions, g, _ = self.estimate(batch, loss0=loss)      # g_i = (L(θ+εz_i) − L(θ−εz_i)) / 2ε
        if not finite(loss, *(c for _, c in directions)):
            self.discard_grads()
            return StepStats(loss=loss, zo_coef=g, skipped=True)
        lr_fo = self.fo_update(step)                             # φ ← φ − η_fo ∇φ L
        updates = self.zo_updates(directions, step)              # θ ← θ − η_zo (Σ c_i z_i + λ θ)
        return StepStats(loss=loss, lr_fo=lr_fo, lr_zo=updates[0].lr, zo_coef=g, zo_updates=updates)
