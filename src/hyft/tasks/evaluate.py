"""Accuracy of a model on a list of Examples, batched by length, with a progress bar."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hyft.distributed import Communicator
from hyft.tasks.base import Example
from hyft.tasks.scoring import Normalize, candidate_scores, encode, padding_for


@dataclass
class EvalResult:
    accuracy: float
    n: int
    seconds: float
    predictions: list[int]

    @property
    def examples_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


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
    order = sorted(range(len(examples)), key=lambda i: sum(len(c) + len(x) for c, x in examples[i].pairs()))
    order = order[comm.rank::comm.world]
    predictions = [0] * len(examples)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode(), tqdm(total=len(order), desc=desc, disable=not progress, leave=False) as bar:
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
        accuracy=correct / max(len(examples), 1),
        n=len(examples),
        seconds=time.perf_counter() - start,
        predictions=predictions,
    )
