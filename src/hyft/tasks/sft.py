"""Rows in the formats of TRL's SFT datasets, as Examples trained with the LM loss on the completion only:

- ``{"prompt", "completion"}`` (strings, or message lists: conversational prompt-completion);
- ``{"messages": [{"role", "content"}, ...]}``: the last assistant message is the completion, everything
  before it the prompt, both rendered with the tokenizer's chat template when encoded;
- ``{"text"}``: a plain LM loss on the whole text.
"""

from __future__ import annotations

from typing import Any

from hyft.tasks.base import Chat, Example

FORMATS = ("prompt-completion", "messages", "text")


def detect(row: dict[str, Any]) -> str:
    """Which TRL format a row is in (a ValueError naming the fields it lacks otherwise)."""
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    if "text" in row:
        return "text"
    raise ValueError(f"a TRL SFT row needs 'prompt' and 'completion', 'messages' or 'text'; it has {sorted(row)}")


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                              for m in value):
        raise ValueError("messages must be a list of {'role', 'content'} objects")
    return tuple((str(m["role"]), str(m["content"])) for m in value)


def example(row: dict[str, Any]) -> Example:
    """The Example of one TRL-format row: context (the prompt, or a :class:`Chat`) and its completion."""
    kind = detect(row)
    if kind == "text":
        text = str(row["text"])
        if not text.strip():
            raise ValueError("empty text")
        return Example("", (text,), 0)
    if kind == "messages":
        messages = _messages(row["messages"])
        if not messages or messages[-1][0] != "assistant":
            raise ValueError("the last message must be the assistant's (the completion)")
        return Example(Chat(messages[:-1]), (messages[-1][1],), 0)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):  # conversational prompt-completion
        done = _messages(completion)
        return Example(Chat(_messages(prompt)), (done[-1][1] if done else "",), 0)
    if not str(completion):
        raise ValueError("empty completion")
    return Example(str(prompt), (str(completion),), 0)
