"""Exclusive wall-clock timing of a step's pieces (forward, backward, perturbation, update).

A timed call's own time excludes the timed calls nested in it: the forward inside ``loss_with_grad`` is
counted as forward, the rest of it as backward; perturbations drawn in forward hooks count as
perturbation, not forward. On CUDA every boundary synchronises, so the split is exact but the observed step
is slower than an unobserved one: the CPU can no longer queue work while the GPU runs, and the engine has a
boundary per perturbed module. :meth:`SplitTimer.measure_unobserved` times the same step with the boundaries
switched off (one synchronisation before and one after), the step time to compare where syncs are real.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from functools import wraps
from typing import Any

import torch

CATEGORIES = ("forward", "backward", "perturb", "update", "other")


def device_sync(device: torch.device) -> Callable[[], None] | None:
    """What waits for ``device``'s queued work: None on the CPU (nothing is queued), else the accelerator's sync
    (CUDA, XPU, MPS, ... through ``torch.accelerator``): a timing that skips it measures only the queueing."""
    if device.type == "cpu":
        return None
    return lambda: torch.accelerator.synchronize(device)


class SplitTimer:
    def __init__(self, sync: Callable[[], None] | None = None, enabled: bool = True):
        self.synchronising = sync is not None  # a real device sync: observed and unobserved steps differ
        self.sync = sync or (lambda: None)
        self.enabled = enabled
        self.observing = True
        self.totals: defaultdict[str, float] = defaultdict(float)
        self._children: list[float] = []

    def timed(self, fn: Callable[..., Any], category: str) -> Callable[..., Any]:
        if not self.enabled:
            return fn

        @wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not self.observing:
                return fn(*args, **kwargs)
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

    def measure_unobserved(self, step: Callable[[], None]) -> float:
        """Run ``step`` once with every boundary switched off: its wall time between two synchronisations."""
        self.observing = False
        try:
            self.sync()
            start = time.perf_counter()
            step()
            self.sync()
            return time.perf_counter() - start
        finally:
            self.observing = True
