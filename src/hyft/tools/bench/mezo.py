"""The published MeZO step (Malladi et al., 2023, Algorithm 1), kept as the benchmark's reference row.

Per tensor, z is drawn with ``torch.normal`` after re-seeding the global RNG, four times per step:
θ += εz, θ −= 2εz, θ += εz (restore), θ −= η·g·z. The weights are written in place (MeZO's code
builds new tensors instead; in place is the cheaper variant). Not used for training: the in-place
sequence does not restore θ exactly in low precision, which hyft's engine avoids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class MeZOReference:
    """A MeZO step on ``params``; ``generated`` counts the random numbers drawn (for RNG sweeps/step)."""

    def __init__(self, params: list[nn.Parameter], loss: Callable[[], Tensor], eps: float = 1e-3,
                 lr: float = 1e-7, seed: int = 0):
        self.params, self.loss, self.eps, self.lr = params, loss, eps, lr
        self.seeds = torch.Generator().manual_seed(seed)
        self.generated = 0

    def _draw_and_add(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)
            p.data.add_(z, alpha=scale)
            self.generated += z.numel()

    def perturb(self, seed: int, scale: float) -> None:
        """θ += scale·ε·z(seed), in place."""
        self._draw_and_add(seed, scale * self.eps)

    def update(self, seed: int, g: float) -> None:
        """θ −= η·g·z(seed), in place."""
        self._draw_and_add(seed, -self.lr * g)

    @torch.no_grad()
    def step(self) -> float:
        seed = int(torch.randint(0, 2**31, (1,), generator=self.seeds).item())
        self.perturb(seed, +1)
        plus = self.loss().item()
        self.perturb(seed, -2)
        minus = self.loss().item()
        self.perturb(seed, +1)
        g = (plus - minus) / (2 * self.eps)
        self.update(seed, g)
        return (plus + minus) / 2
