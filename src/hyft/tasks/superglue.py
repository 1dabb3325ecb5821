"""SuperGLUE tasks prompted as in MeZO: WSC (does the pronoun refer to the noun phrase?), CB (three-way
entailment) and COPA (which choice is the cause/effect, each scored as its own continuation)."""

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


class CB(Task):
    name = "cb"
    description = "SuperGLUE CB: 'Suppose <premise> Can we infer that \"<hypothesis>\"? ...' -> Yes / No / Maybe"
    files = {"train": "cb/train.jsonl", "validation": "cb/val.jsonl"}
    labels = ("entailment", "contradiction", "neutral")
    candidates = ("Yes", "No", "Maybe")  # MeZO's verbalizer, in label order

    def rows(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        return read_jsonl(self.path(split))

    def render(self, row: dict[str, Any]) -> Example:
        context = (f"Suppose {row['premise'].strip()} Can we infer that \"{row['hypothesis'].strip()}\"? "
                   "Yes, No, or Maybe?\n")
        return Example(context=context, candidates=self.candidates, gold=self.labels.index(row["label"]))


class COPA(Task):
    name = "copa"
    description = "SuperGLUE COPA: '<premise without period> because/so' -> each choice, scored on its own tokens"
    files = {"train": "copa/train.jsonl", "validation": "copa/val.jsonl"}
    connectors = {"cause": " because", "effect": " so"}

    def rows(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        return read_jsonl(self.path(split))

    def render(self, row: dict[str, Any]) -> Example:
        context = row["premise"].strip().rstrip(".") + self.connectors[row["question"]]
        choices = tuple(" " + c[:1].lower() + c[1:] for c in (row["choice1"].strip(), row["choice2"].strip()))
        label = row["label"]
        if label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {label!r}")
        return Example(context=context, candidates=choices, gold=label)
