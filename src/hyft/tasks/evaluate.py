"""A model's metrics on a task's Examples, batched by length, with a progress bar: accuracy for choice tasks,
EM/F1 of generated answers, loss and perplexity of gold completions."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hyft.distributed import Communicator
from hyft.precision import autocast
from hyft.tasks.base import Example, Task
from hyft.tasks.generation import generate
from hyft.tasks.metrics import exact_match, f1
from hyft.tasks.scoring import Normalize, candidate_scores, encode, padding_for, prompt_text, token_logprobs

# a task kind's metrics, the first one the headline; and whether a larger score is better
METRICS = {"choice": ("accuracy",), "generate": ("f1", "exact_match"), "lm": ("loss", "perplexity")}


@dataclass
class EvalResult:
    """A task's metrics on some examples (``METRICS[kind]``); ``score`` is the one best-dev selection maximises:
    accuracy, F1, or minus the loss."""

    metrics: dict[str, float]
    n: int
    seconds: float
    predictions: list = field(default_factory=list)  # class indices, or generated answers

    @property
    def score(self) -> float:
        name = next(iter(self.metrics))
        return -self.metrics[name] if name == "loss" else self.metrics[name]

    @property
    def accuracy(self) -> float:
        """The headline metric (accuracy on choice tasks), kept for callers that predate other kinds."""
        return self.metrics[next(iter(self.metrics))]

    def describe(self) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in self.metrics.items())

    @property
    def examples_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def evaluate_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task, examples: Sequence[Example],
                  batch_size: int = 16, normalize: Normalize = "mean", max_length: int = 256,
                  progress: bool = True, desc: str = "eval", comm: Communicator | None = None,
                  precision: str = "none") -> EvalResult:
    """The task's own metrics: accuracy (choice), EM/F1 of greedy answers (generate), token-weighted loss and
    perplexity of the gold completions (lm); ``precision``: the forwards' autocast (as in training)."""
    with autocast(precision, next(model.parameters()).device):
        if task.kind == "generate":
            return evaluate_generation(model, tokenizer, examples, batch_size, task.max_new_tokens, task.stop,
                                       max_length, progress, desc, comm)
        if task.kind == "lm":
            return evaluate_lm(model, tokenizer, examples, batch_size, max_length, progress, desc, comm)
        return evaluate(model, tokenizer, examples, batch_size, normalize, max_length, progress, desc, comm)


def _grad_free(model: nn.Module) -> AbstractContextManager:
    """Inference mode, except for an FSDP2-sharded model: its first forward may be FSDP2's lazy set-up, whose
    buffers must stay ordinary tensors for the training steps that follow (no_grad)."""
    sharded = isinstance(next(model.parameters()), DTensor)
    return torch.no_grad() if sharded else torch.inference_mode()


def _by_length(examples: Sequence[Example], comm: Communicator) -> list[int]:
    order = sorted(range(len(examples)), key=lambda i: sum(len(c) + len(x) for c, x in examples[i].pairs()))
    return order[comm.rank::comm.world]


def evaluate_lm(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                batch_size: int = 16, max_length: int = 256, progress: bool = True, desc: str = "eval",
                comm: Communicator | None = None) -> EvalResult:
    """Σ −log p over every completion token / the number of them (float64 sums; over all ranks), and its exp."""
    start, comm = time.perf_counter(), comm or Communicator()
    order = _by_length(examples, comm)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with _grad_free(model), tqdm(total=len(order), desc=desc, disable=not progress, leave=False) as bar:
        for lo in range(0, len(order), batch_size):
            idx = order[lo: lo + batch_size]
            batch = encode(tokenizer, [examples[i] for i in idx], max_length, padding_for(model),
                           gold_only=True).to(device)
            logp, count = token_logprobs(model, batch)
            total += torch.stack([-logp.sum().double().cpu(), count.sum().double().cpu()])
            bar.update(len(idx))
    model.train(was_training)
    if comm.world > 1:
        total = comm.sum_(total, "eval")
    loss = float(total[0] / total[1]) if total[1] else float("nan")
    return EvalResult({"loss": loss, "perplexity": math.exp(loss) if loss == loss else loss}, len(examples),
                      time.perf_counter() - start)


def evaluate_generation(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                        batch_size: int = 16, max_new_tokens: int = 32, stop: Sequence[str] = ("\n",),
                        max_length: int = 256, progress: bool = True, desc: str = "eval",
                        comm: Communicator | None = None) -> EvalResult:
    """Greedy answers (batched, left-padded, KV cache) scored by SQuAD's exact match and F1, best over each
    example's gold answers, averaged. Long prompts lose tokens from the left (the context's start), so the
    question at the end is kept."""
    start, comm = time.perf_counter(), comm or Communicator()
    order = _by_length(examples, comm)
    prompts = [prompt_text(tokenizer, examples[i].context) for i in order]  # type: ignore[arg-type]
    answers = []
    with tqdm(total=len(order), desc=desc, disable=not progress, leave=False) as bar:
        for lo in range(0, len(prompts), batch_size):
            answers += generate(model, tokenizer, prompts[lo: lo + batch_size], max_new_tokens, stop, batch_size,
                                max_length)
            bar.update(len(prompts[lo: lo + batch_size]))
    scores = torch.zeros(2, dtype=torch.float64)
    predictions: list = [""] * len(examples)
    for i, answer in zip(order, answers, strict=True):
        gold = examples[i].answers or (examples[i].candidates[examples[i].gold].strip(),)
        predictions[i] = answer.strip()
        scores += torch.tensor([f1(answer, gold), exact_match(answer, gold)], dtype=torch.float64)
    if comm.world > 1:
        scores = comm.sum_(scores, "eval")
    n = max(len(examples), 1)
    return EvalResult({"f1": float(scores[0]) / n, "exact_match": float(scores[1]) / n}, len(examples),
                      time.perf_counter() - start, predictions)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 16,
    normalize: Normalize = "mean",
    max_length: int = 256,
    progress: bool = True,
    desc: str = "eval",
    comm: Communicator | None = None,
) -> EvalResult:
    """Score every candidate, predict the argmax, and report accuracy.

    Examples are batched in order of length (less padding) and predictions returned in input order.
    Data parallel (``comm``): each rank scores every world-th example of that order, and the predictions
    are gathered, so every rank returns the same result.
    """
    start = time.perf_counter()
    comm = comm or Communicator()
    order = _by_length(examples, comm)
    predictions = [0] * len(examples)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with _grad_free(model), tqdm(total=len(order), desc=desc, disable=not progress, leave=False) as bar:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            batch = encode(tokenizer, [examples[i] for i in idx], max_length, padding_for(model)).to(device)
            for i, p in zip(idx, candidate_scores(model, batch, normalize).argmax(-1).tolist(), strict=True):
                predictions[i] = p
            bar.update(len(idx))
    model.train(was_training)
    if comm.world > 1:  # each position is predicted by one rank and 0 on the others: the sum gathers them
        predictions = comm.sum_(torch.tensor(predictions, dtype=torch.int64), "eval").tolist()
    correct = sum(int(p == ex.gold) for p, ex in zip(predictions, examples, strict=True))
    return EvalResult(
        metrics={"accuracy": correct / max(len(examples), 1)},
        n=len(examples),
        seconds=time.perf_counter() - start,
        predictions=predictions,
    )
