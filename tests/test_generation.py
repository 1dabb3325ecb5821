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


def test_decoding_ends_once_every_row_has_produced_a_stop_string(tokenizer):
    """Stop strings end the batch's decoding early, and the answers are the full decodings cut at them."""
    model = tiny_model("llama", len(tokenizer))
    model.generation_config.eos_token_id = None
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=8, stop=(), batch_size=4)
    assert len(calls) == 8  # one forward per new token
    first = generate(model, tokenizer, PROMPTS, max_new_tokens=1, stop=(), batch_size=4)
    stops = tuple({t for t in first if t.strip()})  # each row's first token: every row stops at once
    assert len(stops) >= 2 and all(t.strip() for t in first)
    calls.clear()
    cut = generate(model, tokenizer, PROMPTS, max_new_tokens=8, stop=stops, batch_size=4)
    assert len(calls) == 1
    assert cut == [cut_at_stop(f, stops) for f in full]
    # one row stops at its third token and the others decode on: their answers are unchanged
    third = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=3, stop=(), batch_size=1)[0]
    third = third[len(generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, stop=(), batch_size=1)[0]):]
    assert third.strip()
    mixed = generate(model, tokenizer, PROMPTS, max_new_tokens=8, stop=(third,), batch_size=4)
    assert mixed == [cut_at_stop(f, (third,)) for f in full]
    assert mixed[0] != full[0] and any(m == f for m, f in zip(mixed, full, strict=True))
