"""Learning-rate schedules as plain functions of the step, so each parameter group can have its own."""

from __future__ import annotations

import math


def lr_at(base: float, kind: str, step: int, total: int, warmup: int = 0) -> float:
    """Learning rate at ``step`` (0-based) of ``total``: linear warmup, then constant, linear or cosine decay."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    if kind == "constant":
        return base
    if kind == "linear":
        return base * max(0.0, 1.0 - progress)
    if kind == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"unknown schedule {kind!r}")
