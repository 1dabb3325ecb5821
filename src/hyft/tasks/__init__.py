"""Task registry: built-in tasks by name (and, through :func:`get_task`, a user's task file later)."""

from __future__ import annotations

from hyft.errors import HyftError
from hyft.tasks.base import DATA_DIR, Example, Splits, Task, sample_splits
from hyft.tasks.custom import load_custom_task
from hyft.tasks.generative import Alpaca, SQuAD
from hyft.tasks.glue import SST2
from hyft.tasks.superglue import CB, COPA, WSC
from hyft.tasks.winogrande import WinoGrande

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (SST2, CB, COPA, WSC, WinoGrande, SQuAD, Alpaca)}


def get_task(name: str) -> Task:
    """A built-in task by name, or a user's task from a YAML file (``path/to/task.yaml``)."""
    if name.endswith((".yaml", ".yml")):
        return load_custom_task(name)
    if name not in TASKS:
        raise HyftError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or a task .yaml file)")
    return TASKS[name]()


__all__ = ["DATA_DIR", "TASKS", "Example", "Splits", "Task", "get_task", "sample_splits"]
