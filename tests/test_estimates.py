"""Consistent estimates: the hybrid step's order (φ's gradient and both SPSA losses at the same φ, φ and θ
updated after), SPSA forwards in eval mode, and a one-sided L0 that is never a train-mode (dropout) loss."""

from __future__ import annotations

import pytest
import torch

from hyft.config import RunConfig
from hyft.methods import METHODS, Objective
from hyft.methods.base import train_mode_is_eval_mode
from hyft.methods.params import prepare
from tests.conftest import tiny_model


class Recorder:
    """The objective, noting for every call: train mode, grad mode and a fingerprint of φ."""

    def __init__(self, objective, fo_params):
        self.objective, self.fo_params, self.calls = objective, fo_params, []

    def encode(self, examples):
        return self.objective.encode(examples)

    def __call__(self, batch):
        phi = torch.cat([p.detach().flatten() for _, p in self.fo_params]).clone()
        self.calls.append((self.objective.model.training, torch.is_grad_enabled(), phi))
        return self.objective(batch)


def hybrid(tokenizer, estimator: str, lr: float, dropout: float = 0.1):
    model = tiny_model("opt", len(tokenizer), dropout=dropout)
    config = RunConfig(method="hybrid", estimator=estimator, lr_fo=lr, lr_zo=lr * 1e-2, eps=1e-2,
                       lora_dropout=dropout)
    model, groups = prepare(model, config)
    method = METHODS["hybrid"].rule(model, groups, Objective(model, tokenizer, config), config, total=4)
    method.objective = Recorder(method.objective, groups.fo)
    return method, groups


@pytest.mark.parametrize("estimator", ["two-sided", "one-sided"])
def test_hybrid_step_order_and_modes(estimator, tokenizer, examples):
    """The first-order pass runs in train mode with grad; every SPSA forward runs in eval mode without
    grad and sees the φ of the start of the step; φ changes only after them."""
    method, groups = hybrid(tokenizer, estimator, lr=0.5)
    phi_before = torch.cat([p.detach().flatten() for _, p in groups.fo]).clone()
    method.step(examples, 0)
    calls = method.objective.calls
    k = next(i for i, (_, grad, _) in enumerate(calls) if grad)  # before it: the one-time dropout measurement
    assert k in (0, 2) and all(not grad for _, grad, _ in calls[:k])
    first, spsa = calls[k], calls[k + 1:]
    assert first[0] and first[1]  # train mode, grad on: the FO pass
    assert len(spsa) == 2  # two-sided: L(θ+εz), L(θ−εz); one-sided under dropout: L(θ+εz), L(θ) in eval mode
    for training, grad, phi in spsa:
        assert not training and not grad
        assert torch.equal(phi, phi_before)  # φ is not updated before the SPSA forwards
    assert not torch.equal(torch.cat([p.detach().flatten() for _, p in groups.fo]), phi_before)


def test_one_sided_coefficient_uses_eval_mode_losses_at_both_points(tokenizer, examples):
    """Under dropout the one-sided coefficient is (L_eval(θ+εz) − L_eval(θ))/ε for the step's seed, not a
    difference against the train-mode loss of the first-order pass."""
    method, _ = hybrid(tokenizer, "one-sided", lr=0.0)
    stats = method.step(examples, 0)
    batch = method.objective.encode(examples)
    method.model.eval()
    with torch.no_grad():
        loss0 = method.objective.objective(batch).item()
        with method.engine.perturbed(stats.zo_updates[0].seed, 1e-2):
            plus = method.objective.objective(batch).item()
    assert stats.zo_coef == pytest.approx((plus - loss0) / 1e-2, rel=1e-5, abs=1e-6)


def test_one_sided_without_dropout_reuses_the_first_order_loss(tokenizer, examples):
    """Without dropout the train-mode loss is L(θ), so the one-sided step costs one forward less."""
    method, _ = hybrid(tokenizer, "one-sided", lr=0.1, dropout=0.0)
    method.step(examples, 0)
    assert len(method.objective.calls) == 2 + 2  # dropout measured once (train, eval), the FO pass and L(θ+εz)
    method.step(examples, 1)
    assert len(method.objective.calls) == 4 + 2  # measured once only


def test_dropout_is_measured_not_read_from_a_list(tokenizer, examples):
    """Train mode against eval mode on one batch: dropout modules, functional dropout read from a config,
    and layerdrop (which no list of dropout names covered) are all found; the RNG stream is left as it was."""
    def measured(model):
        objective = Objective(model, tokenizer, RunConfig(method="hybrid"))
        state = torch.get_rng_state()
        result = train_mode_is_eval_mode(model, objective, objective.encode(examples[:4]))
        assert torch.equal(torch.get_rng_state(), state)
        return result

    assert measured(tiny_model("llama", len(tokenizer)))
    assert not measured(tiny_model("opt", len(tokenizer), dropout=0.1))  # functional dropout read from config
    lora, _ = prepare(tiny_model("llama", len(tokenizer)), RunConfig(method="hybrid", lora_dropout=0.5))
    assert not measured(lora)  # peft's lora_dropout module
    layerdrop = tiny_model("opt", len(tokenizer), dropout=0.0)
    layerdrop.model.decoder.layerdrop = 0.9  # OPT drops whole decoder layers in train mode (no nn.Dropout)
    assert not measured(layerdrop)
