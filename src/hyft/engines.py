"""The ZO engine of a parameter group: dense (every element) or sparse (a fixed mask), one interface."""

from __future__ import annotations

from torch import Tensor, nn

from hyft.sparse import SparseEngine
from hyft.zo import ZOEngine

Engine = ZOEngine | SparseEngine


def make_engine(model: nn.Module, params: list[tuple[str, nn.Parameter]], dist: str, eps: float,
                two_sided: bool, compensate: bool, mask: list[Tensor] | None = None, rounding: str = "nearest"
                ) -> Engine:
    """``mask``: flat positions per tensor (see :mod:`hyft.masks`), or None for dense directions."""
    if mask is None:
        return ZOEngine(model, params, dist, eps=eps, two_sided=two_sided, compensate=compensate, rounding=rounding)
    return SparseEngine(model, params, mask, dist, compensate=compensate)
