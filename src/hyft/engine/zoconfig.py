"""The ZO configuration of a run: what a direction is and how an estimate is made from it.

It is written as the ZO log's header and read back from it by replay and resume, so the trainers (the CLI's
and ``HybridTrainer``) and replay cannot disagree about ε, the distribution, the estimator, q, the mask or
the rounding. The header keys are the ones logs have always had (``zo_q``, ``zo_mask``, ...), so older logs
read back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from hyft.engine import noise
from hyft.engine.estimators import ESTIMATORS
from hyft.engine.masks import MASKS

DISTS = ("rademacher", "gaussian", "lowrank")
ESTIMATOR_KINDS = ("two-sided", "one-sided")
ROUNDINGS = ("nearest", "stochastic")

# ZOConfig field -> ZO-log header key
_HEADER_KEYS = {"eps": "eps", "dist": "dist", "estimator": "estimator", "q": "zo_q", "combine": "zo_combine",
                "mask": "zo_mask", "density": "zo_density", "compensate": "zo_compensate",
                "rounding": "zo_rounding", "params": "zo_params", "sparse_applied": "zo_sparse_applied",
                "rank": "zo_rank", "lazy": "zo_lazy", "root": "zo_lowrank_root"}
# what a header written before a field existed meant by its absence
_HEADER_DEFAULTS = {"zo_q": 1, "zo_combine": "mean", "zo_mask": None, "zo_density": None, "zo_compensate": True,
                    "zo_rounding": "nearest", "zo_params": None,
                    "zo_sparse_applied": False,  # before it, sparse bf16 updates moved along z
                    "zo_rank": None, "zo_lazy": None, "zo_lowrank_root": None}


@dataclass(frozen=True)
class ZOConfig:
    """ε, directions, estimator, q and its combination, sparse mask, bf16 rounding, and which weights."""

    eps: float = 1e-3
    dist: str = "rademacher"
    estimator: str = "two-sided"
    q: int = 1
    combine: str = "mean"
    mask: str | None = None
    density: float | None = None  # the mask's density (None without a mask)
    compensate: bool = True
    rounding: str = "nearest"
    params: str | None = None  # regex on parameter names; None: the method's whole ZO group
    sparse_applied: bool = True  # sparse bf16/fp16 updates move along the applied direction, as dense ones
    rank: int | None = None  # lowrank: the rank R of z = U Vᵀ/√R (None for dense directions)
    lazy: int | None = None  # lowrank: steps each V is held
    root: int | None = None  # lowrank: the seed root of the V factors

    def problems(self) -> list[str]:
        """What is wrong with these values, one phrase each (empty when valid)."""
        checks = [
            (self.eps > 0, f"eps must be > 0, got {self.eps}"),
            (self.dist in DISTS, f"zo_dist must be one of {', '.join(DISTS)}, got {self.dist!r}"),
            (self.estimator in ESTIMATOR_KINDS, f"estimator must be one of {', '.join(ESTIMATOR_KINDS)}, "
                                                f"got {self.estimator!r}"),
            (self.q >= 1, f"zo_q must be >= 1, got {self.q}"),
            (self.combine in ESTIMATORS, f"zo_combine must be one of {', '.join(ESTIMATORS)}, got {self.combine!r}"),
            (self.mask is None or self.mask in MASKS, f"zo_mask must be one of {', '.join(MASKS)}, got {self.mask!r}"),
            (self.density is None or 0 < self.density <= 1, f"zo_density must be in (0, 1], got {self.density}"),
            (self.rounding in ROUNDINGS, f"zo_rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}"),
            (self.dist != "lowrank" or (self.rank or 0) >= 1, f"zo_rank must be >= 1, got {self.rank}"),
            (self.dist != "lowrank" or (self.lazy or 0) >= 1, f"zo_lazy must be >= 1, got {self.lazy}"),
        ]
        return [message for ok, message in checks if not ok]

    @property
    def two_sided(self) -> bool:
        return self.estimator == "two-sided"

    def header(self, **run: Any) -> dict[str, Any]:
        """The ZO log's header: these fields under their log keys, the direction scheme, and ``run`` (model,
        method, dtype, device, the ZO tensors' names and count) that replay checks against."""
        values = {key: getattr(self, name) for name, key in _HEADER_KEYS.items()}
        return {**run, "scheme": noise.SCHEME, **values}

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> ZOConfig:
        """The configuration a ZO log was written with."""
        values = {name: header.get(key, _HEADER_DEFAULTS.get(key)) for name, key in _HEADER_KEYS.items()}
        return cls(**{f.name: values[f.name] for f in fields(cls)})
