"""A weight as this process holds it: the whole tensor, or (FSDP2) a DTensor whose local piece is a block of
rows. Directions are drawn at global flat positions, so a shard needs its local tensor and where it starts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from hyft.errors import HyftError


def is_sharded(t: Tensor) -> bool:
    return isinstance(t, DTensor)


def local(t: Tensor) -> tuple[Tensor, int]:
    """(this process's elements of ``t``, the global flat position of the first one): (t, 0) when whole."""
    if not isinstance(t, DTensor):
        return t, 0
    if any(not isinstance(p, Shard | Replicate) for p in t.placements) or any(
            isinstance(p, Shard) and p.dim != 0 for p in t.placements):
        raise HyftError(f"a weight sharded as {t.placements} is not a block of rows; shard with FSDP2's default "
                        "Shard(0)")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    piece = t.to_local()
    return piece, (offset[0] * math.prod(t.shape[1:]) if t.dim() else 0)


def full(t: Tensor) -> Tensor:
    """The whole tensor on every process (a collective for a DTensor: every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_from_full_(t: Tensor, value: Tensor) -> None:
    """Set ``t`` (whole, or this process's shard of it) from the whole tensor ``value``."""
    local(t)[0].view(-1).copy_(slice_of(value, t))


def slice_of(value: Tensor, t: Tensor) -> Tensor:
    """The flat elements of the whole tensor ``value`` that this process holds of ``t`` (all of them when whole)."""
    piece, start = local(t)
    return value.reshape(-1)[start:start + piece.numel()]


def full_rows(rows: Tensor, like: Tensor) -> Tensor:
    """The whole tensor whose local rows are ``rows``, sharded as ``like`` is (a collective for a DTensor; a
    residual kept per shard is gathered this way)."""
    if not isinstance(like, DTensor):
        return rows
    return DTensor.from_local(rows, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()

