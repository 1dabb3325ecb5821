"""What a task is: files → Examples (context, candidate continuations, gold index), and the MeZO sampling.

A task knows nothing about models. Scoring turns each (context, continuation) pair into tokens and
compares the candidates' log-likelihoods.
"""

from __future__ import annotations

import csv
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyft.errors import HyftError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Chat:
    """A conversation as the context of an example: (role, content) messages, rendered with the tokenizer's
    chat template when it is encoded (the task knows no tokenizer); the completion is the next assistant
    turn."""

    messages: tuple[tuple[str, str], ...]

    def __len__(self) -> int:  # a length for sorting by size, as for a string context
        return sum(len(content) for _, content in self.messages)


@dataclass(frozen=True)
class Example:
    """One example: a context and candidate continuations, scored by likelihood (classification), or one
    gold continuation trained with the LM loss on its tokens only (generative tasks).

    ``context`` is shared by every candidate, or given per candidate (WinoGrande fills the blank with each
    option and scores only the shared continuation after it), or a :class:`Chat`. ``answers``: every gold
    answer of a generation task (SQuAD's EM/F1 take the best over them).
    """

    context: str | tuple[str, ...] | Chat
    candidates: tuple[str, ...]
    gold: int
    answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.gold < len(self.candidates):
            raise ValueError(f"gold index {self.gold} out of range for {len(self.candidates)} candidates")
        if isinstance(self.context, tuple) and len(self.context) != len(self.candidates):
            raise ValueError("per-candidate contexts must match the candidates one to one")

    def pairs(self) -> list[tuple[str | Chat, str]]:
        """(context, continuation) for each candidate, in candidate order."""
        contexts = self.context if isinstance(self.context, tuple) else (self.context,) * len(self.candidates)
        return list(zip(contexts, self.candidates, strict=True))


@dataclass
class Splits:
    """The three sampled splits of a run, and notes on how they were drawn (printed to the user)."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    notes: list[str] = field(default_factory=list)

    def get(self, name: str) -> list[Example]:
        if name not in ("train", "dev", "test"):
            raise HyftError(f"unknown split {name!r}; choose train, dev or test")
        return getattr(self, name)


class Task(ABC):
    """A task reads its source files and renders rows as Examples.

    Source splits: ``train`` (the training file, from which train and dev are sampled) and
    ``validation`` (the labelled evaluation file, from which test is sampled, as in MeZO).
    """

    name: str
    description: str
    files: dict[str, str]  # source split -> path relative to the data directory
    kind: str = "choice"  # choice: candidates scored; lm: LM loss and perplexity; generate: answers generated
    max_new_tokens: int = 32  # generate: the answer's budget
    stop: tuple[str, ...] = ("\n",)  # generate: where an answer ends

    def path(self, split: str) -> Path:
        return DATA_DIR / self.files[split]

    @abstractmethod
    def render(self, row: dict[str, Any]) -> Example:
        """Turn one parsed row into an Example; raise KeyError/ValueError/TypeError on bad fields."""

    @abstractmethod
    def rows(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, row) pairs of a source split."""

    def read(self, split: str) -> list[Example]:
        """All examples of a source split; a malformed row raises HyftError naming file and line."""
        if split not in self.files:
            raise HyftError(f"task {self.name!r} has no split {split!r}; it has {', '.join(self.files)}")
        path = self.path(split)
        examples = []
        for line_no, row in self.rows(split):
            try:
                examples.append(self.render(row))
            except (KeyError, ValueError, TypeError, AttributeError) as err:
                raise HyftError(f"{path}:{line_no}: malformed {self.name} row ({type(err).__name__}: {err})") from err
        if not examples:
            raise HyftError(f"{path}: no examples found")
        return examples


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a JSON-lines file; blank lines are skipped, bad JSON names the file and line."""
    if not path.is_file():
        raise HyftError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise HyftError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise HyftError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def read_delimited(path: Path, columns: tuple[str, ...], delimiter: str = "\t") -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a TSV/CSV file with a header that must contain ``columns``."""
    if not path.is_file():
        raise HyftError(f"data file not found: {path}")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None or any(c not in header for c in columns):
            raise HyftError(f"{path}:1: header {header} lacks the columns {list(columns)}")
        for line_no, values in enumerate(reader, start=2):
            if not values:
                continue
            if len(values) != len(header):
                raise HyftError(f"{path}:{line_no}: expected {len(header)} fields, found {len(values)}")
            yield line_no, dict(zip(header, values, strict=True))


def sample_splits(
    task: Task,
    seed: int = 0,
    num_train: int = 1000,
    num_dev: int = 500,
    num_test: int = 1000,
    reader: Callable[[str], list[Example]] | None = None,
) -> Splits:
    """MeZO's protocol: shuffle the training file with ``seed``; dev is drawn first, train from the rest
    (disjoint), dev at most a quarter of the file; test is up to ``num_test`` examples of the validation
    file (all of them if fewer).
    A training file too small for both gets a smaller train split and a note, never an error.
    """
    read = reader or task.read
    source = read("train")
    rng = random.Random(seed)
    order = list(range(len(source)))
    rng.shuffle(order)
    notes = []
    if num_dev > len(source) // 4:  # small training files (CB, COPA, WSC) keep most rows for training
        notes.append(f"{task.name}: dev capped at {len(source) // 4} of the training file's {len(source)} rows "
                     f"(asked for {num_dev})")
        num_dev = len(source) // 4
    dev_idx = order[:num_dev]
    train_idx = order[num_dev : num_dev + num_train]
    if len(train_idx) < num_train:
        notes.append(
            f"{task.name}: the training file has {len(source)} rows; after {len(dev_idx)} dev examples "
            f"{len(train_idx)} remain for training (asked for {num_train})"
        )
    validation = read("validation")
    test_order = list(range(len(validation)))
    if len(validation) > num_test:
        random.Random(seed).shuffle(test_order)
        test_order = sorted(test_order[:num_test])
    return Splits(
        train=[source[i] for i in train_idx],
        dev=[source[i] for i in dev_idx],
        test=[validation[i] for i in test_order],
        notes=notes,
    )
