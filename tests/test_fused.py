"""The fused hybrid step: φ's gradient taken at the SPSA point θ+εz, the coefficient of a two-sided SPSA,
in-place shifts that the ZO log replays bitwise, and a fallback to the separate step where it cannot run."""

from __future__ import annotations

import copy

import pytest
import torch

from hyft.config import RunConfig
from hyft.engine.zo import ZOEngine
from hyft.methods import METHODS, Objective
from hyft.methods.params import prepare
from tests.conftest import tiny_model


def fused_hybrid(tokenizer, lr_fo=0.1, lr_zo=1e-2, dtype=torch.float32, **overrides):
    model = tiny_model("llama", len(tokenizer)).to(dtype)
    config = RunConfig(method="hybrid", lr_fo=lr_fo, lr_zo=lr_zo, eps=1e-2, **overrides)
    model, groups = prepare(model, config)
    method = METHODS["hybrid"].rule(model, groups, Objective(model, tokenizer, config), config, total=4)
    return method, groups


def test_fused_gradient_is_phis_gradient_at_theta_plus_eps_z(tokenizer, examples):
    method, groups = fused_hybrid(tokenizer)
    reference = copy.deepcopy(method)  # the same model, φ, and seed stream
    grads = {}
    original = method.fo_update

    def capture(step):
        grads.update({n: p.grad.clone() for n, p in groups.fo})
        return original(step)

    method.fo_update = capture
    stats = method.step(examples, 0)
    assert method.fused
    # by hand on the copy: ∇φ L(θ+εz(seed), φ) with the perturbation as temporaries
    engine, batch = reference.engine, reference.objective.encode(examples)
    reference.model.train()
    with engine.perturbed(stats.zo_updates[0].seed, 1e-2):
        reference.objective(batch).backward()
    for n, p in [(n, p) for n, p in reference.model.named_parameters() if p.requires_grad]:
        assert torch.allclose(grads[n], p.grad, rtol=1e-5, atol=1e-7), n
    at_theta = copy.deepcopy(reference)  # and not the gradient at θ
    at_theta.model.zero_grad()
    at_theta.objective(batch).backward()
    assert any(not torch.allclose(grads[n], p.grad, rtol=1e-5, atol=1e-7)
               for n, p in at_theta.model.named_parameters() if p.requires_grad)


def test_fused_coefficient_is_the_two_sided_spsa_difference(tokenizer, examples):
    method, _ = fused_hybrid(tokenizer)
    reference = copy.deepcopy(method)
    stats = method.step(examples, 0)
    seed, batch = stats.zo_updates[0].seed, reference.objective.encode(examples)
    with reference.engine.perturbed(seed, 1e-2):
        plus = reference.loss_eval(batch)
    with reference.engine.perturbed(seed, -1e-2):
        minus = reference.loss_eval(batch)
    assert stats.zo_coef == pytest.approx((plus - minus) / 2e-2, rel=1e-3, abs=1e-4)
    assert stats.zo_updates[0].shifts == (1e-2, -2e-2, 1e-2)


def test_fused_run_replays_bitwise_and_a_zero_step_stays_within_rounding(tokenizer, examples):
    method, groups = fused_hybrid(tokenizer)
    start = copy.deepcopy(method.model)
    updates = [u for step in range(3) for u in method.step(examples, step).zo_updates]
    fresh = ZOEngine(start, [(n, p) for n, p in start.named_parameters() if n in dict(groups.zo)],
                     method.engine.dist, eps=1e-2)
    for u in updates:  # the log's lines, each applied in one pass
        fresh.update(u)
    replayed = dict(start.named_parameters())
    for name, p in groups.zo:
        assert torch.equal(p, replayed[name]), name

    still, zo = fused_hybrid(tokenizer, lr_fo=0.0, lr_zo=0.0)
    before = [p.detach().clone() for _, p in zo.zo]
    still.step(examples, 0)
    for (_, p), b in zip(zo.zo, before, strict=True):  # +ε, −2ε, +ε in float32: a few ulps of |θ| + 2ε|z|
        assert (p - b).abs().max() <= 4 * 2.0**-24 * (b.abs().max() + 2e-2 * 6)


@pytest.mark.parametrize("why", [dict(fused=False), dict(estimator="one-sided"), dict(zo_q=2),
                                 dict(dtype=torch.bfloat16), dict(lora_dropout=0.1)])
def test_fused_form_falls_back_to_the_separate_step(why, tokenizer, examples):
    method, _ = fused_hybrid(tokenizer, **why)
    method.step(examples, 0)  # dropout is measured on the first batch
    assert not method.fused


@pytest.mark.parametrize("method_name", ["hybrid", "zo-full"])
def test_a_skipped_step_changes_nothing(method_name, tokenizer, examples):
    """A non-finite loss pair: θ is only put back from its in-place shifts (no learning rate, no weight decay,
    even with weight_decay_zo > 0), φ keeps its value and its optimizer state, and the log says lr 0."""
    model = tiny_model("llama", len(tokenizer))
    config = RunConfig(method=method_name, lr_fo=0.1, lr_zo=1e-2, eps=1e-2, weight_decay_zo=0.5)
    model, groups = prepare(model, config)
    method = METHODS[method_name].rule(model, groups, Objective(model, tokenizer, config), config, total=4)
    theta = [p.detach().clone() for _, p in groups.zo]
    phi = [p.detach().clone() for _, p in groups.fo]
    method.loss_eval = lambda batch: float("nan")  # every SPSA point diverges
    stats = method.step(examples, 0)
    assert stats.skipped and stats.lr_zo is None and stats.lr_fo is None
    assert [(u.lr, u.weight_decay, u.coef) for u in stats.zo_updates] == [(0.0, 0.0, 0.0)]
    for (_, p), before in zip(groups.zo, theta, strict=True):  # +ε, −2ε, +ε in float32: a few ulps, no decay
        assert (p - before).abs().max() <= 4 * 2.0**-24 * (before.abs().max() + 2e-2 * 6)
    for (_, p), before in zip(groups.fo, phi, strict=True):
        assert torch.equal(p, before)
    assert method.optimizer is None or not method.optimizer.state
