"""SST-2 (GLUE): binary sentiment, prompted as in MeZO: ``<sentence> It was`` → `` terrible`` / `` great``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hyft.tasks.base import Example, Task, read_delimited


class SST2(Task):
    name = "sst2"
    description = "GLUE SST-2 sentiment: '<sentence> It was' -> ' terrible' / ' great'"
    files = {"train": "sst2/train.tsv", "validation": "sst2/dev.tsv"}
    candidates = (" terrible", " great")

    def rows(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        return read_delimited(self.path(split), ("sentence", "label"))

    def render(self, row: dict[str, Any]) -> Example:
        label = int(row["label"])
        if label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {label}")
        # The GLUE file ends every sentence with one space; the template adds its own.
        sentence = row["sentence"].strip()
        if not sentence:
            raise ValueError("empty sentence")
        return Example(context=f"{sentence} It was", candidates=self.candidates, gold=label)
