"""The ZO engine of a parameter group: dense (every element), sparse (a fixed mask) or low-rank (U Vᵀ per
matrix), one interface."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from hyft.engine import shards
from hyft.engine.lowrank import LowRankEngine
from hyft.engine.sharded import ShardedEngine
from hyft.engine.sparse import SparseEngine
from hyft.engine.zmath import Applied
from hyft.engine.zo import ZOEngine, canonical_name
from hyft.engine.zoconfig import ZOConfig

Engine = ZOEngine | SparseEngine | LowRankEngine


def make_engine(model: nn.Module, params: list[tuple[str, nn.Parameter]], zo: ZOConfig,
                mask: list[Tensor] | None = None) -> Engine:
    """``mask``: flat positions per tensor (see :mod:`hyft.engine.masks`), or None for dense directions.
    Sharded weights (FSDP2): dense directions get :class:`ShardedEngine`; the sparse and low-rank engines work
    on each process's rows themselves."""
    if zo.dist != "lowrank" and mask is None and any(shards.is_sharded(p) for _, p in params):
        return ShardedEngine(params, zo.dist, eps=zo.eps, two_sided=zo.two_sided, compensate=zo.compensate,
                             rounding=zo.rounding)
    if zo.dist == "lowrank":
        if mask is not None:
            raise ValueError("low-rank directions take no sparse mask")
        assert zo.rank is not None and zo.lazy is not None and zo.root is not None
        return LowRankEngine(model, params, zo.rank, zo.lazy, zo.root, eps=zo.eps, two_sided=zo.two_sided,
                             compensate=zo.compensate)
    if mask is None:
        return ZOEngine(model, params, zo.dist, eps=zo.eps, two_sided=zo.two_sided, compensate=zo.compensate,
                        rounding=zo.rounding)
    return SparseEngine(model, params, mask, zo.dist, compensate=zo.compensate,
                        applied=Applied(zo.eps, zo.two_sided) if zo.sparse_applied else None)


def describe(engine: Engine) -> dict[str, Any]:
    """The ZO tensors as a log header records them, so replay can check it has the same model."""
    names = [canonical_name(n) for n, _ in engine.params]
    return {"num_tensors": len(names), "numel": engine.numel, "first": names[:1], "last": names[-1:]}
