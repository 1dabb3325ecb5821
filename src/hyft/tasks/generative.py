"""Generative built-in tasks: SQuAD v1.1 (answers generated, scored by EM/F1) and Alpaca (instruction data,
held-out loss and perplexity)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

from hyft.tasks.base import Chat, Example, Task, read_jsonl


def squad_test_article(title: str) -> bool:
    """The article split: a quarter of the titles (by a hash of the title) are test; no context of a test
    question is ever seen in training or dev."""
    return zlib.crc32(title.encode()) % 4 == 0


class SQuAD(Task):
    name = "squad"
    description = "SQuAD v1.1 QA by generation (MeZO's prompt), EM/F1; train/test split by article"
    files = {"train": "squad/dev.jsonl", "validation": "squad/dev.jsonl"}
    kind = "generate"
    max_new_tokens = 24
    stop = ("\n",)

    def rows(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        want_test = split == "validation"
        return ((n, row) for n, row in read_jsonl(self.path(split))
                if squad_test_article(str(row.get("title", ""))) == want_test)

    def render(self, row: dict[str, Any]) -> Example:
        answers = tuple(dict.fromkeys(a.strip() for a in row["answers"]["text"] if a.strip()))
        if not answers:
            raise ValueError("no answer")
        title = row["title"].replace("_", " ")
        prompt = f"Title: {title}\nContext: {row['context'].strip()}\nQuestion: {row['question'].strip()}\nAnswer:"
        return Example(prompt, (f" {answers[0]}\n",), 0, answers=answers)


class Alpaca(Task):
    name = "alpaca"
    description = "Stanford Alpaca instructions through the chat template; held-out loss and perplexity"
    files = {"train": "alpaca/train.jsonl", "validation": "alpaca/test.jsonl"}
    kind = "lm"

    def rows(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """Every row with an output: 3 of the 5,000 training rows have an empty one (as in the original
        alpaca_data.json) and teach nothing, so they are skipped."""
        return ((n, row) for n, row in read_jsonl(self.path(split)) if str(row.get("output", "")).strip())

    def render(self, row: dict[str, Any]) -> Example:
        instruction, extra, output = row["instruction"].strip(), row.get("input", "").strip(), row["output"].strip()
        if not instruction or not output:
            raise ValueError("empty instruction or output")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Example(Chat((("user", user),)), (output,), 0)
