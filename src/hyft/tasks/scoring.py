"""Candidate scoring: Examples → padded token batches → per-candidate log-likelihoods, accuracy, losses.

Pure functions of (model, batch). Every candidate of an example goes through the model in the same batch.
Sequences are left-padded by default so that all continuations end at the last position and the LM head
only has to run on the last few positions (``logits_to_keep``), which saves most of the vocabulary
projection; right padding is supported and gives the same scores.

When every candidate of every example in a batch is a single token after a shared context (SST-2, WSC),
one forward of the context scores all candidates at once: half the compute of one row per candidate,
and exactly the same log-likelihoods.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from hyft.tasks.base import Chat, Example

Normalize = Literal["mean", "sum"]


@dataclass
class Batch:
    """Token ids of every (context, continuation) pair of some examples, and where the continuations are."""

    input_ids: Tensor  # [N, T]
    attention_mask: Tensor  # [N, T]
    position_ids: Tensor  # [N, T], counted from each row's first real token
    target_mask: Tensor  # [N, T] True where the token belongs to the continuation being scored
    num_candidates: list[int]  # per example; N == sum(num_candidates)
    gold: Tensor  # [B] gold candidate index per example
    keep: int  # trailing positions whose logits are needed (T when right-padded)
    candidate_ids: Tensor | None = None  # [B, K] single-token fast path: rows are contexts, -1 pads ragged K

    def to(self, device: torch.device | str) -> Batch:
        move = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
        return Batch(**{**vars(self), **move})


def encode(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int = 256,
    padding_side: Literal["left", "right"] = "left",
    gold_only: bool = False,
) -> Batch:
    """Tokenise context and continuation separately (so the boundary is exact) and pad into one batch.

    Contexts that do not fit ``max_length`` lose tokens from the left; continuations are never cut.
    ``gold_only`` keeps just the gold candidate of each example (for the LM loss).
    """
    rows, counts, fast = _example_rows(tokenizer, examples, max_length, gold_only)
    return _pad(tokenizer, [r for ex in rows for r in ex], counts, _gold(examples, gold_only), padding_side, fast)


@dataclass
class Pieces:
    """One minibatch evaluated as several smaller batches: the loss is ``Σ weights[i] · loss(batches[i])``,
    which equals the whole batch's loss (the weights are each piece's share of what the loss averages)."""

    batches: list[Batch]
    weights: list[float]

    def to(self, device: torch.device | str) -> Pieces:
        return Pieces([b.to(device) for b in self.batches], self.weights)


Encoded = Batch | Pieces  # what a training objective evaluates


def encode_pieces(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    size: int,
    max_length: int = 256,
    padding_side: Literal["left", "right"] = "left",
    gold_only: bool = False,
) -> Pieces:
    """The examples sorted by length and cut into batches of at most ``size``: each piece is padded only to
    its own longest row, so less compute goes to padding, and a backward holds one piece's activations.

    Weights: the examples' share for the classification loss (a mean over examples), the scored tokens'
    share for the LM loss (a mean over tokens, ``gold_only``).
    """
    rows, counts, fast = _example_rows(tokenizer, examples, max_length, gold_only)
    gold = _gold(examples, gold_only)
    order = sorted(range(len(examples)), key=lambda i: max(len(ids) for ids, _ in rows[i]))  # stable
    batches = []
    for start in range(0, len(order), size):
        chosen = order[start : start + size]
        batches.append(_pad(tokenizer, [r for i in chosen for r in rows[i]], [counts[i] for i in chosen],
                            gold[chosen], padding_side, None if fast is None else fast[chosen]))
    if gold_only:
        scored = [float(b.target_mask[:, -b.keep + 1 :].sum()) for b in batches]  # what token_logprobs counts
        weights = [n / sum(scored) for n in scored]
    else:
        weights = [len(b.num_candidates) / len(examples) for b in batches]
    return Pieces(batches, weights)


def _gold(examples: Sequence[Example], gold_only: bool) -> Tensor:
    """[B] the gold candidate's index per example (0 when only the gold candidate is encoded)."""
    return torch.tensor([0 if gold_only else ex.gold for ex in examples], dtype=torch.long)


def _example_rows(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int, gold_only: bool
) -> tuple[list[list[tuple[list[int], int]]], list[int], Tensor | None]:
    """Per example: its (token ids, continuation length) rows and its candidate count; and the single-token
    candidate ids when every example qualifies (then an example's one row is its context, continuation 0)."""
    if not gold_only and (fast := _single_token_candidates(tokenizer, examples)) is not None:
        rows = [[(tokenizer(ex.pairs()[0][0]).input_ids[-max_length:], 0)] for ex in examples]
        return rows, [len(ex.candidates) for ex in examples], fast
    rows = []
    for ex in examples:
        pairs = ex.pairs()
        if gold_only:
            pairs = [pairs[ex.gold]]
        own = []
        for context, continuation in pairs:
            ctx, cont = context_ids(tokenizer, context), completion_ids(tokenizer, context, continuation)
            if not cont:
                raise ValueError(f"candidate {continuation!r} tokenises to nothing")
            budget = max(max_length - len(cont), 1)
            own.append((ctx[-budget:] + cont, len(cont)))
        rows.append(own)
    return rows, [len(r) for r in rows], None


def render_chat(tokenizer: PreTrainedTokenizerBase, chat: Chat, answer: str | None = None) -> str:
    """The conversation as text: the tokenizer's chat template (with the assistant's turn opened, or closed
    around ``answer``), or ``role: content`` lines when the tokenizer has none."""
    messages = [{"role": r, "content": c} for r, c in chat.messages]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=answer is None)
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return lines if answer is not None else lines + "assistant:"


def prompt_text(tokenizer: PreTrainedTokenizerBase, context: str | Chat) -> str:
    """What a model is given to continue: the context, a chat rendered up to the assistant's turn."""
    return render_chat(tokenizer, context) if isinstance(context, Chat) else context


def context_ids(tokenizer: PreTrainedTokenizerBase, context: str | Chat) -> list[int]:
    """The context's tokens; an empty context (a plain-text LM example) is the BOS (else EOS, else pad) token,
    so that the text's first token is predicted too."""
    if isinstance(context, Chat):
        return tokenizer(render_chat(tokenizer, context), add_special_tokens=False).input_ids
    ids = tokenizer(context, add_special_tokens=True).input_ids
    if not ids:
        start = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                      if t is not None), None)
        if start is None:
            raise ValueError("a plain-text example needs a BOS, EOS or pad token to start from")
        ids = [start]
    return ids


def completion_ids(tokenizer: PreTrainedTokenizerBase, context: str | Chat, completion: str) -> list[int]:
    """The continuation's tokens. After a chat: the assistant's turn as the template closes it (its end-of-turn
    token included, so the model learns to stop), cut from the whole conversation rendered once."""
    if not isinstance(context, Chat):
        return tokenizer(completion, add_special_tokens=False).input_ids
    prompt, whole = render_chat(tokenizer, context), render_chat(tokenizer, context, completion)
    tail = whole[len(prompt):] if whole.startswith(prompt) else completion
    return tokenizer(tail, add_special_tokens=False).input_ids


def _pad(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[tuple[list[int], int]],
    counts: list[int],
    gold: Tensor,
    padding_side: str,
    candidate_ids: Tensor | None = None,
) -> Batch:
    """Pad (token ids, continuation length) rows into a Batch."""
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(rows)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    target = torch.zeros((n, width), dtype=torch.bool)
    for i, (ids, n_cont) in enumerate(rows):
        start = width - len(ids) if padding_side == "left" else 0
        end = start + len(ids)
        input_ids[i, start:end] = torch.tensor(ids)
        attention[i, start:end] = 1
        target[i, end - n_cont : end] = n_cont > 0
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    keep = (max(c for _, c in rows) + 1) if padding_side == "left" else width
    return Batch(input_ids, attention, positions, target, counts, gold, min(keep, width), candidate_ids)


def _single_token_candidates(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]) -> Tensor | None:
    """[B, K] candidate token ids when every example shares one context and all candidates are one token."""
    rows = []
    for ex in examples:
        if isinstance(ex.context, Chat) or (isinstance(ex.context, tuple) and len(set(ex.context)) > 1):
            return None
        ids = [tokenizer(c, add_special_tokens=False).input_ids for c in ex.candidates]
        if any(len(i) != 1 for i in ids):
            return None
        rows.append([i[0] for i in ids])
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(base))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    """Per model class, once: inspecting a signature on every forward is wasted work in the hot path."""
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def prompt_learning(model: nn.Module) -> bool:
    """A peft prompt-learning model (prompt, prefix, p-tuning): virtual tokens come before the input."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def padding_for(model: nn.Module) -> Literal["left", "right"]:
    """Left padding (only the last logits computed) except for prompt learning, where peft puts the virtual
    tokens before the whole row and ignores position ids: right padding keeps every real token at the
    position it has unpadded."""
    return "right" if prompt_learning(model) else "left"


def _kept_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Logits of the last ``batch.keep`` positions, computing only those where the model allows it."""
    kwargs = {}
    virtual = prompt_learning(model)
    if virtual and batch.keep < batch.input_ids.shape[1]:
        raise ValueError("prompt-learning models need right-padded batches (encode(..., padding_for(model)))")
    if batch.keep < batch.input_ids.shape[1] and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = batch.keep
    if not virtual:  # peft computes the positions of prompt-learning inputs itself
        kwargs["position_ids"] = batch.position_ids
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs).logits
    logits = logits[:, -batch.keep :]  # drops the virtual tokens' logits of prompt tuning
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


CE_ROWS = 4  # rows per cross-entropy call (see token_logprobs)


def token_logprobs(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Sum of log p(continuation token | prefix) per row, and the number of scored tokens per row.

    The cross-entropy runs on ``CE_ROWS`` rows at a time: on the transposed logits it allocates a multiple of
    the logits it is given. Whole-batch, Alpaca's two longest evaluation batches took a process to 6,360 MB;
    in chunks, 3,399 MB (``scripts/lm_eval_peak.py``), with the same losses. A test pins the chunked values and
    gradients to the whole-batch bits.
    """
    k = batch.keep
    logits = _kept_logits(model, batch)[:, :-1]  # position t predicts token t + 1
    targets = batch.input_ids[:, -k + 1 :]
    mask = batch.target_mask[:, -k + 1 :]
    logp = -torch.cat([F.cross_entropy(rows.transpose(1, 2), goal, reduction="none")  # split: one cat backward
                       for rows, goal in zip(logits.split(CE_ROWS), targets.split(CE_ROWS), strict=True)])
    return (logp * mask).sum(-1), mask.sum(-1)


def candidate_scores(model: nn.Module, batch: Batch, normalize: Normalize = "mean") -> Tensor:
    """[B, K] candidate scores (mean or summed token log-likelihood); ragged K is padded with -inf."""
    if batch.candidate_ids is not None:
        return _single_token_scores(model, batch)
    total, count = token_logprobs(model, batch)
    per_row = total / count if normalize == "mean" else total
    k_max = max(batch.num_candidates)
    scores = per_row.new_full((len(batch.num_candidates), k_max), float("-inf"))
    offset = 0
    for i, k in enumerate(batch.num_candidates):
        scores[i, :k] = per_row[offset : offset + k]
        offset += k
    return scores


def _single_token_scores(model: nn.Module, batch: Batch) -> Tensor:
    """Log p(candidate token | context), read from the logits at each context's last real position."""
    assert batch.candidate_ids is not None
    logits = _kept_logits(model, batch)
    width = batch.input_ids.shape[1]
    positions = torch.arange(width, device=batch.attention_mask.device)
    last = (batch.attention_mask * positions).amax(-1) - (width - batch.keep)
    logp = logits[torch.arange(len(last), device=last.device), last].log_softmax(-1)
    ids = batch.candidate_ids
    scores = logp.gather(-1, ids.clamp(min=0))
    return scores.masked_fill(ids < 0, float("-inf"))


def classification_loss(scores: Tensor, gold: Tensor) -> Tensor:
    """MeZO's train-as-classification: cross-entropy over the candidates' scores."""
    return F.cross_entropy(scores, gold)


def lm_loss(model: nn.Module, gold_batch: Batch) -> Tensor:
    """Token-averaged LM cross-entropy on the gold continuations (a batch built with ``gold_only``)."""
    total, count = token_logprobs(model, gold_batch)
    return -total.sum() / count.sum()


def accuracy(scores: Tensor, gold: Tensor) -> float:
    return (scores.argmax(-1) == gold).float().mean().item()
