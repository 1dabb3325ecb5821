"""Update rules by ``--method`` name. Adding one is a new file here and one line in METHODS: its spec says
which parameters it trains by ZO and by FO, and config validation, parameter grouping, the trainer
(checkpoints, snapshots, what it saves) and export ask the spec instead of comparing names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hyft.methods.base import Method, Objective, StepStats
from hyft.methods.fo import FirstOrder
from hyft.methods.hybrid import Hybrid
from hyft.methods.zo import ZerothOrder

Group = Literal["base", "peft"] | None


@dataclass(frozen=True)
class MethodSpec:
    """A method: its update rule and the parameters each of its groups trains ("base": the model's own
    weights, "peft": the PEFT module attached for it, None: no such group)."""

    rule: type[Method]
    zo: Group = None
    fo: Group = None

    @property
    def uses_peft(self) -> bool:
        """A PEFT module is attached (and saved as the run's adapter)."""
        return "peft" in (self.zo, self.fo)

    @property
    def zo_on_base(self) -> bool:
        """The ZO log rebuilds the base: snapshots, replay and export go through it."""
        return self.zo == "base"

    @property
    def fo_on_base(self) -> bool:
        """The base is trained directly: the run keeps the best-dev model itself."""
        return self.fo == "base"


METHODS: dict[str, MethodSpec] = {
    "hybrid": MethodSpec(Hybrid, zo="base", fo="peft"),
    "fo-full": MethodSpec(FirstOrder, fo="base"),
    "fo-peft": MethodSpec(FirstOrder, fo="peft"),
    "zo-full": MethodSpec(ZerothOrder, zo="base"),
    "zo-peft": MethodSpec(ZerothOrder, zo="peft"),
}

__all__ = ["METHODS", "Method", "MethodSpec", "Objective", "StepStats"]
