"""Update rules by ``--method`` name. Adding one is a new file here and one line in METHODS."""

from __future__ import annotations

from hyft.methods.base import Method, Objective, StepStats
from hyft.methods.fo import FirstOrder
from hyft.methods.hybrid import Hybrid
from hyft.methods.zo import ZerothOrder

METHODS: dict[str, type[Method]] = {
    "hybrid": Hybrid,
    "fo-full": FirstOrder,
    "fo-peft": FirstOrder,
    "zo-full": ZerothOrder,
    "zo-peft": ZerothOrder,
}

__all__ = ["METHODS", "Method", "Objective", "StepStats"]
