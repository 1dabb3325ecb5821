"""Minibatch order: random reshuffling (a fresh permutation every epoch), shuffle-once, or file order."""

from __future__ import annotations

from typing import Any

import torch

from hyft.seeds import derive_seed


class EpochSampler:
    """Walks epochs of ``n`` examples in batches; every example is visited exactly once per epoch
    (the last batch of an epoch may be smaller)."""

    def __init__(self, n: int, batch_size: int, mode: str = "reshuffle", seed: int = 0):
        if mode not in ("reshuffle", "once", "none"):
            raise ValueError(f"unknown shuffle mode {mode!r}")
        self.n, self.batch_size, self.mode = n, batch_size, mode
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "sampler"))
        self.epoch, self.position = 0, 0
        self.order = self._permutation()

    def _permutation(self) -> list[int]:
        if self.mode == "none":
            return list(range(self.n))
        return torch.randperm(self.n, generator=self.generator).tolist()

    def next_batch(self) -> list[int]:
        if self.position >= self.n:
            self.epoch += 1
            self.position = 0
            if self.mode == "reshuffle":
                self.order = self._permutation()
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += len(batch)
        return batch

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "order": list(self.order),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.order = state["epoch"], state["position"], list(state["order"])
        self.generator.set_state(state["generator"])
