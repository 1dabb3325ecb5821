"""SuperGLUE WSC: does the pronoun refer to the noun phrase? Prompted as in MeZO / PromptSource."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hyft.tasks.base import Example, Task, read_jsonl


def parse_bool(value: Any) -> bool:
    """SuperGLUE copies store labels as JSON booleans or as the strings "true"/"false"."""
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError(f"label must be true or false, got {value!r}")
    return text == "true"


class WSC(Task):
    name = "wsc"
    description = "SuperGLUE WSC coreference: passage + 'does the pronoun ... refer to ...?' -> ' No' / ' Yes'"
    files = {"train": "wsc/train.jsonl", "validation": "wsc/val.jsonl"}
    candidates = (" No", " Yes")

    def rows(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        return read_jsonl(self.path(split))

    def render(self, row: dict[str, Any]) -> Example:
        target = row["target"]
        span1, span2 = target["span1_text"], target["span2_text"]
        text = row["text"].strip()
        context = (
            f"{text}\nQuestion: In the passage above, does the pronoun \"{span2}\" refer to {span1}?\nAnswer:"
        )
        return Example(context=context, candidates=self.candidates, gold=int(parse_bool(row["label"])))
