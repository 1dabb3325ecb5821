"""A user's task from a YAML file and JSONL/TSV/CSV data, no code. Example::

    name: product-reviews
    train: reviews_train.jsonl          # paths are relative to the YAML file
    test: reviews_test.jsonl            # labelled evaluation file (test is sampled from it)
    template: "Review: {text}\\nSentiment:"
    label_field: stars
    candidates: {"1": " negative", "5": " positive"}   # label value -> candidate continuation

or, with candidates taken from each row (the label is then a 0-based index, or mapped by ``label_map``)::

    template: "{question}"
    candidate_fields: [choice1, choice2]
    label_field: answer
    label_map: {"A": 0, "B": 1}

Generative kinds: ``kind: sft`` trains with the LM loss on the completion only and reports loss and
perplexity; its rows are TRL SFT rows (``prompt``/``completion``, ``messages``, ``text``), or any rows
with ``template`` (the prompt) and ``completion`` (the target) over their fields. ``kind: generate`` asks
for answers by greedy decoding from ``template`` and scores them against ``answer_field`` (a string or a
list of gold answers) by SQuAD's exact match and F1 (``max_new_tokens``, ``stop``)::

    kind: generate
    template: "Question: {question}\nAnswer:"
    answer_field: answers
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hyft.errors import HyftError
from hyft.files import read_mapping
from hyft.tasks import sft
from hyft.tasks.base import Example, Task, read_delimited, read_jsonl

KEYS = {"name", "description", "train", "test", "format", "template", "label_field", "candidates",
        "candidate_fields", "label_map", "kind", "completion", "answer_field", "max_new_tokens", "stop"}
KINDS = ("choice", "sft", "generate")  # sft: TRL-format rows (or template + completion), LM loss, perplexity


class CustomTask(Task):
    """A task defined by a YAML file: a context template over row fields and candidates."""

    def __init__(self, spec: dict[str, Any], source: Path):
        self.source = source
        where = str(source)
        unknown = sorted(set(spec) - KEYS)
        if unknown:
            raise HyftError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(KEYS))}")
        kind = spec.get("kind", "choice")
        if kind not in KINDS:
            raise HyftError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = {"sft": "lm"}.get(kind, kind)
        self.max_new_tokens = int(spec.get("max_new_tokens", 32))
        self.stop = tuple(spec.get("stop", ["\n"]))
        self._common(spec, where)
        if kind == "choice":
            self._check_choice(spec, where)
        elif kind == "generate" and not (isinstance(spec.get("template"), str) and spec.get("answer_field")):
            raise HyftError(f"{where}: a generate task needs 'template' (the prompt) and 'answer_field'")
        elif kind == "sft" and ("template" in spec) != ("completion" in spec):
            raise HyftError(f"{where}: an sft task takes both 'template' and 'completion', or neither (TRL rows: "
                            "prompt/completion, messages or text)")
        self.spec = spec
        self.name = str(spec.get("name", source.stem))
        self.description = str(spec.get("description", f"custom {kind} task from {source}"))
        self.files = {"train": spec["train"], "validation": spec["test"]}
        fmt = spec.get("format")
        if fmt is not None and fmt not in ("jsonl", "tsv", "csv"):
            raise HyftError(f"{where}: format must be jsonl, tsv or csv")
        self.format = fmt

    @staticmethod
    def _common(spec: dict[str, Any], where: str) -> None:
        for key in ("train", "test"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise HyftError(f"{where}: '{key}' is required and must be a string")

    @staticmethod
    def _check_choice(spec: dict[str, Any], where: str) -> None:
        for key in ("template", "label_field"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise HyftError(f"{where}: '{key}' is required and must be a string")
        if ("candidates" in spec) == ("candidate_fields" in spec):
            raise HyftError(f"{where}: give exactly one of 'candidates' (label -> text) or 'candidate_fields'")
        if "candidates" in spec and (not isinstance(spec["candidates"], dict) or len(spec["candidates"]) < 2):
            raise HyftError(f"{where}: 'candidates' must map at least two label values to candidate texts")
        if "candidate_fields" in spec and (
            not isinstance(spec["candidate_fields"], list) or len(spec["candidate_fields"]) < 2
        ):
            raise HyftError(f"{where}: 'candidate_fields' must list at least two field names")
        if "label_map" in spec and not isinstance(spec["label_map"], dict):
            raise HyftError(f"{where}: 'label_map' must map label values to 0-based candidate indices")

    def path(self, split: str) -> Path:
        return (self.source.parent / self.files[split]).resolve()

    def rows(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        path = self.path(split)
        fmt = self.format or path.suffix.lstrip(".").lower()
        columns = tuple(f for f in self._fields() if f)
        if fmt == "jsonl":
            return read_jsonl(path)
        if fmt in ("tsv", "csv"):
            return read_delimited(path, columns, "\t" if fmt == "tsv" else ",")
        raise HyftError(f"{path}: cannot tell the format from the extension; set format: jsonl, tsv or csv")

    def _fields(self) -> list[str]:
        import string

        templates = [self.spec[k] for k in ("template", "completion") if isinstance(self.spec.get(k), str)]
        fields = [name for t in templates for _, name, _, _ in string.Formatter().parse(t) if name]
        extra = [self.spec[k] for k in ("label_field", "answer_field") if self.spec.get(k)]
        return [*fields, *extra, *self.spec.get("candidate_fields", [])]

    def render(self, row: dict[str, Any]) -> Example:
        if self.kind == "lm":
            if "template" not in self.spec:
                return sft.example(row)
            return Example(self.spec["template"].format_map(_Row(row)),
                           (self.spec["completion"].format_map(_Row(row)),), 0)
        if self.kind == "generate":
            value = row[self.spec["answer_field"]]
            answers = tuple(str(a) for a in (value if isinstance(value, list) else [value]) if str(a).strip())
            if not answers:
                raise ValueError(f"no answer in {self.spec['answer_field']!r}")
            stop = self.stop[0] if self.stop else ""
            return Example(self.spec["template"].format_map(_Row(row)), (f" {answers[0]}{stop}",), 0,
                           answers=answers)
        context = self.spec["template"].format_map(_Row(row))
        label = row[self.spec["label_field"]]
        if "candidates" in self.spec:
            texts = [str(t) for t in self.spec["candidates"].values()]
            labels = [str(k) for k in self.spec["candidates"]]
            if str(label) not in labels:
                raise ValueError(f"label {label!r} is not one of the candidates' labels {labels}")
            return Example(context, tuple(texts), labels.index(str(label)))
        texts = [str(row[f]) for f in self.spec["candidate_fields"]]
        label_map = self.spec.get("label_map")
        gold = int(label_map[str(label)]) if label_map is not None else int(label)
        return Example(context, tuple(texts), gold)


class _Row(dict):
    """Template fields: a missing one raises KeyError naming it (reported with file and line)."""

    def __missing__(self, key: str) -> str:
        raise KeyError(f"template field {key!r} is not in the row")


def load_custom_task(path: str | Path) -> CustomTask:
    spec = read_mapping(path, "task", "a task file is a mapping of keys (train, test, template, ...)",
                        empty_ok=False)
    return CustomTask(spec, Path(path))
