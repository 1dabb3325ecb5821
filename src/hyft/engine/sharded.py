"""Dense directions on sharded weights (FSDP2): each process perturbs and updates only the rows it holds,
drawing z at their global flat positions, so every element sees exactly the z of an unsharded run and the
ZO log is the same. Nothing but the step's losses crosses the network for ZO; FSDP2's all-gather carries
the perturbed rows to the forward.

A perturbed forward writes θ + r + s·z into the local rows and writes the saved rows back afterwards, which
is exact in every dtype (one extra copy of this process's rows, 1/N of the weights, while perturbed). The
values written are bitwise those the unsharded engine's hooks compute, and updates, in-place shifts (the
fused step) and the bf16 rules are the same element-wise arithmetic (:mod:`hyft.engine.zmath`) on the rows.
Snapshots gather the whole tensors through :class:`hyft.engine.zo.EngineState` (a collective).

The sparse and low-rank engines need no class of their own: they look up each weight's local rows too
(:func:`hyft.engine.shards.local`), a mask keeps the positions inside them, and a low-rank fold adds the
same rows of A Vᵀ.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from hyft.engine import noise, shards, zmath
from hyft.engine.zo import ZOEngine, direction_seed


class ShardedEngine(ZOEngine):
    """:class:`ZOEngine`'s interface on the local rows of DTensor weights (whole tensors pass through). It
    shares ZOEngine's update rule and its state (``_init_update_rule``), not the hooks that stream whole
    weights, so it does not run ``ZOEngine.__init__``."""

    def __init__(self, params: list[tuple[str, nn.Parameter]], dist: str = "gaussian", eps: float | None = None,
                 two_sided: bool = True, compensate: bool = True, rounding: str = "nearest"):
        self.params = params  # views reads it
        self._init_update_rule(params, dist, eps, two_sided, compensate, rounding, [piece for piece, _ in self.views])
        self._checked = True

    @property
    def views(self) -> list[tuple[Tensor, int]]:
        """(local rows, global flat start) of every weight, looked up at each use: FSDP2's lazy set-up at the
        first forward moves the rows into new storage, so a view taken earlier would be stale."""
        return [shards.local(p.detach()) for _, p in self.params]

    def target(self, i: int, step_seed: int) -> zmath.Target:
        piece, start = shards.local(self.params[i][1].detach())
        return zmath.Target(piece, self.residuals[i], direction_seed(step_seed, self.params[i][0]), start)

    def direction(self, i: int, step_seed: int) -> Tensor:
        """This process's slice of z (flat, float32): bitwise those elements of the unsharded direction."""
        piece, start = shards.local(self.params[i][1].detach())
        return noise.segment(piece.numel(), direction_seed(step_seed, self.params[i][0]), start, self.dist,
                             piece.device)

    @contextmanager
    def perturbed(self, step_seed: int, scale: float) -> Iterator[None]:
        """Within the block the local rows hold θ + r + scale·z; the saved rows are written back after."""
        views = self.views
        saved = [piece.clone() for piece, _ in views]
        try:
            with torch.no_grad():
                for i, (piece, start) in enumerate(views):
                    t = zmath.Target(saved[i], self.residuals[i], direction_seed(step_seed, self.params[i][0]), start)
                    zmath.perturbed_into(t, piece, scale, self.dist)
            yield
        finally:
            with torch.no_grad():
                for (piece, _), copy in zip(views, saved, strict=True):
                    piece.copy_(copy)
