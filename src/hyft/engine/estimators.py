"""How the SPSA estimates of one step combine into the update: θ ← θ − η Σ_i c_i·z_i.

Each of the q directions z_i of a step gives a coefficient g_i (its finite difference); an estimator turns
[g_1 … g_q] into the logged coefficients [c_1 … c_q]. Replay only needs the c_i (one ZO-log line per
direction), so adding an estimator is one function here and one line in ESTIMATORS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Combine = Callable[[Sequence[float]], list[float]]


def mean(gs: Sequence[float]) -> list[float]:
    """MeZO / ZO-Bench's q-SPSA: the average of the q directional estimates, c_i = g_i / q."""
    return [g / len(gs) for g in gs]


def normalized(gs: Sequence[float]) -> list[float]:
    """FZOO: the average divided by the spread of the q estimates, c_i = g_i / (q·std(g)), so the step
    length is set by η alone (large while the estimates agree in scale, never blown up by one outlier
    batch). Needs q ≥ 2; a zero spread gives a zero step."""
    if len(gs) < 2:
        raise ValueError("the normalized estimator needs at least 2 directions per step (--zo-q)")
    mu = sum(gs) / len(gs)
    std = math.sqrt(sum((g - mu) ** 2 for g in gs) / len(gs))
    return [g / (len(gs) * std) if std > 0 else 0.0 for g in gs]


ESTIMATORS: dict[str, Combine] = {"mean": mean, "normalized": normalized}
