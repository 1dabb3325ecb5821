"""WinoGrande: fill the blank with each option, score only the shared continuation (partial scoring)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hyft.tasks.base import Example, Task, read_jsonl


class WinoGrande(Task):
    name = "winogrande"
    description = "WinoGrande 1.1 (train_l): '<sentence up to the blank><option>' -> shared continuation"
    files = {"train": "winogrande/train_l.jsonl", "validation": "winogrande/dev.jsonl"}

    def rows(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        return read_jsonl(self.path(split))

    def render(self, row: dict[str, Any]) -> Example:
        sentence = row["sentence"]
        if sentence.count("_") != 1:
            raise ValueError(f"sentence must hold exactly one '_' blank: {sentence!r}")
        answer = str(row["answer"])
        if answer not in ("1", "2"):
            raise ValueError(f"answer must be '1' or '2', got {answer!r}")
        before, after = sentence.split("_")
        continuation = after.rstrip()
        if not continuation.strip():
            raise ValueError("nothing after the blank to score")
        contexts = (before + row["option1"], before + row["option2"])
        return Example(context=contexts, candidates=(continuation, continuation), gold=int(answer) - 1)
