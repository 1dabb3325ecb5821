"""Exclusive wall-clock timing of a step's pieces (forward, backward, perturbation, update).

A timed call's own time excludes the timed calls nested in it: the forward inside ``loss_with_grad`` is
counted as forward, the rest of it as backward; perturbations drawn in forward hooks count as
perturbation, not forward. On CUDA every boundary synchronises, so the split is exact but the step is a
little slower than unobserved.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from functools import wraps
from typing import Any

CATEGORIES = ("forward", "backward", "perturb", "update", "other")


class SplitTimer:
    def __init__(self, sync: Callable[[], None] | None = None, enabled: bool = True):
        self.sync = sync or (lambda: None)
        self.enabled = enabled
        self.totals: defaultdict[str, float] = defaultdict(float)
        self._children: list[float] = []

    def timed(self, fn: Callable[..., Any], category: str) -> Callable[..., Any]:
        if not self.enabled:
            return fn

        @wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            self._children.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                elapsed = time.perf_counter() - start
                self.totals[category] += elapsed - self._children.pop()
                if self._children:
                    self._children[-1] += elapsed

        return run

    def measure(self, step: Callable[[], None]) -> dict[str, float]:
        """Run ``step`` once: its wall time and the split, with the untimed rest as ``other``."""
        self.totals.clear()
        self.sync()
        start = time.perf_counter()
        step()
        self.sync()
        total = time.perf_counter() - start
        split = {c: self.totals.get(c, 0.0) for c in CATEGORIES[:-1]}
        split["other"] = max(total - sum(split.values()), 0.0)
        return {"total": total, **split}
