"""--micro-batch-size: a minibatch evaluated in length-sorted pieces has the whole batch's loss, gradient and
training run, with fewer padded tokens than cutting it in batch order."""

from __future__ import annotations

import json

import pytest
import torch

from hyft.config import RunConfig
from hyft.errors import HyftError
from hyft.methods import Objective, base
from hyft.methods.params import prepare
from hyft.tasks import Example
from hyft.tasks.scoring import Pieces, encode, encode_pieces
from hyft.training.loop import Trainer
from tests.conftest import tiny_model
from tests.test_trainer import tiny_config

SINGLE_TOKEN = [  # SST-2's form: one shared context, one-token candidates (the one-forward fast path)
    Example("it was great , a wonderful film . it was", (" great", " terrible"), 0),
    Example("boring", (" great", " terrible"), 1),
    Example("the quick brown fox jumps over the lazy dog . it was", (" great", " terrible"), 0),
]


def _loss_and_grads(objective: Objective, model, examples) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    batch = objective.encode(examples)
    if isinstance(batch, Pieces):
        loss = objective.backward(batch)
    else:
        loss = objective(batch)
        loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", ["classification", "lm"])
@pytest.mark.parametrize("fast_path", [False, True])
def test_pieces_give_the_whole_batch_loss_and_gradient(loss, fast_path, tokenizer, examples):
    chosen = SINGLE_TOKEN + examples[:1] if fast_path else examples  # 4 examples either way
    whole = RunConfig(method="fo-peft", loss=loss)
    model, _ = prepare(tiny_model("llama", len(tokenizer)), whole)
    model.train()
    reference, grads = _loss_and_grads(Objective(model, tokenizer, whole), model, chosen)
    for size in (1, 3):  # 3: pieces of 3 and 1 examples, so unequal weights
        config = RunConfig(method="fo-peft", loss=loss, micro_batch_size=size)
        objective = Objective(model, tokenizer, config)
        pieces = objective.encode(chosen)
        assert isinstance(pieces, Pieces)
        one_forward = fast_path and loss == "classification"  # the LM loss scores the gold continuation
        assert all((b.candidate_ids is not None) == one_forward for b in pieces.batches)
        value, piece_grads = _loss_and_grads(objective, model, chosen)
        assert value == pytest.approx(reference, rel=1e-5)
        with torch.no_grad():
            assert objective(objective.encode(chosen)).item() == pytest.approx(reference, rel=1e-5)
        for name, g in grads.items():
            assert torch.allclose(piece_grads[name], g, rtol=1e-4, atol=1e-7), name


def test_pieces_are_cut_by_length_and_pad_fewer_tokens(tokenizer):
    short, long = "it was", "the quick brown fox jumps over the lazy dog , a wonderful film . it was"
    alternating = [Example(short if i % 2 else long, (" great", " terrible"), 0) for i in range(8)]
    config = RunConfig(method="fo-peft", micro_batch_size=2)
    model, _ = prepare(tiny_model("llama", len(tokenizer)), config)
    pieces = Objective(model, tokenizer, config).encode(alternating)
    assert isinstance(pieces, Pieces) and len(pieces.batches) == 4
    widths = [b.input_ids.shape[1] for b in pieces.batches]
    assert widths == sorted(widths)
    in_order = [encode(tokenizer, alternating[i : i + 2]) for i in range(0, 8, 2)]
    assert sum(b.input_ids.numel() for b in pieces.batches) < sum(b.input_ids.numel() for b in in_order)
    assert sum(pieces.weights) == pytest.approx(1.0)


def test_a_micro_batch_no_smaller_than_the_batch_is_the_whole_batch(tokenizer, examples):
    config = RunConfig(method="fo-peft", micro_batch_size=len(examples))
    model, _ = prepare(tiny_model("llama", len(tokenizer)), config)
    assert not isinstance(Objective(model, tokenizer, config).encode(examples), Pieces)
    with pytest.raises(HyftError, match="micro_batch_size"):
        RunConfig(micro_batch_size=0).validate()


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize(("method", "loss"), [("hybrid", "classification"), ("hybrid", "lm"),
                                            ("fo-full", "classification"), ("zo-full", "lm")])
def test_a_run_in_pieces_matches_the_whole_batch_run(method, loss, tiny_dir, tmp_path, monkeypatch):
    """Batches of 4 in pieces of 3 and 1: a wrong weighting of the pieces changes the losses."""
    cuts = []
    monkeypatch.setattr(base, "encode_pieces", lambda *a, **k: cuts.append(a[2]) or encode_pieces(*a, **k))
    settings = dict(method=method, task="copa", loss=loss, eps=1e-2)
    whole = Trainer(tiny_config(tiny_dir, **settings), tmp_path / "whole", progress=False).run()
    cut = Trainer(tiny_config(tiny_dir, **settings, micro_batch_size=3), tmp_path / "cut", progress=False).run()
    a, b = _rows(tmp_path / "whole"), _rows(tmp_path / "cut")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        if x["zo_coef"] is not None:  # (L+ − L−)/2ε: the pieces' rounding divided by ε = 1e-2
            assert y["zo_coef"] == pytest.approx(x["zo_coef"], rel=1e-3, abs=2e-4)
    assert cut["test_accuracy"] == whole["test_accuracy"]
    assert cuts == [3] * 6  # the second run did go through pieces
