"""Batched greedy generation (left padding, KV cache) gives each prompt's unbatched greedy output."""

from __future__ import annotations

import pytest
import torch

from hyft.tasks.generation import cut_at_stop, generate
from tests.conftest import tiny_model

PROMPTS = ["the film was", "a dull and boring mess of a movie that", "great", "Question: who won?\nAnswer:"]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_batched_greedy_equals_unbatched(arch, tokenizer):
    model = tiny_model(arch, len(tokenizer))
    model.generation_config.eos_token_id = None  # random weights: run to max_new_tokens, no early stop
    sides = (tokenizer.padding_side, tokenizer.truncation_side)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8, stop=(), batch_size=1)[0] for p in PROMPTS]
    together = generate(model, tokenizer, PROMPTS, max_new_tokens=8, stop=(), batch_size=4)
    assert together == alone
    assert any(alone)  # something was generated
    assert (tokenizer.padding_side, tokenizer.truncation_side) == sides  # the caller's tokenizer is left as it was


def test_generation_is_greedy_token_by_token(tokenizer):
    """The first generated token is the argmax of the prompt's last logits."""
    model = tiny_model("llama", len(tokenizer))
    model.generation_config.eos_token_id = None
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    text = generate(model, tokenizer, [PROMPTS[0]], max_new_tokens=1, stop=())[0]
    assert text == tokenizer.decode([first], skip_special_tokens=True)


def test_stop_strings_cut_at_the_earliest():
    assert cut_at_stop("Paris\nQuestion: next", ["\n"]) == "Paris"
    assert cut_at_stop("Paris. Lyon\n", ["\n", "."]) == "Paris"
    assert cut_at_stop("Paris", ["\n"]) == "Paris"
    assert cut_at_stop("Paris", []) == "Paris"
