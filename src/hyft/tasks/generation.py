"""Greedy answers for generation tasks: batched, left-padded, with the KV cache (transformers' ``generate``),
cut at the first stop string; a batch stops decoding once every row has produced one.

Left padding keeps every prompt's last token at the same position, so a batch generates what each prompt
generates alone (``tests/test_generation.py`` checks it token for token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    ends = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 32,
             stop: Sequence[str] = ("\n",), batch_size: int = 8, max_length: int | None = None) -> list[str]:
    """The greedy continuation of each prompt (decoded, cut at ``stop``), ``batch_size`` prompts at a time.
    ``max_length`` cuts long prompts on the left, keeping the question at the end."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    side, trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # a row that has produced a stop string is done, and the batch ends when every row is: what follows a
    # stop is cut anyway, so the answers are the same and the decoding steps fewer
    stops = [s for s in stop if s]
    until = {"stop_strings": stops, "tokenizer": tokenizer} if stops else {}
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                              truncation=max_length is not None, max_length=max_length).to(device)
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=pad, use_cache=True, **until)
            new = tokens[:, batch["input_ids"].shape[1]:]
            out += [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stop) for t in new]
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc
        model.train(was_training)
    return out
