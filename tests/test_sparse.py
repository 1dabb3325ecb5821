"""Sparse and multi-direction ZO: the q-direction, masked estimate's expectation is the masked directional
derivative, masks chosen by magnitude and sensitivity, exact in-place perturbation, and bitwise replay of a
masked q-direction run through the trainer."""

from __future__ import annotations

import pytest
import torch

from hyft.config import RunConfig
from hyft.engine import masks
from hyft.engine.estimators import mean, normalized
from hyft.engine.sparse import SparseEngine
from hyft.engine.zo import ZOEngine, select_params
from hyft.errors import HyftError
from hyft.methods import METHODS, Objective
from hyft.methods.params import prepare
from hyft.tools.replay import replay
from hyft.training.loop import Trainer
from tests.conftest import tiny_model

ONE_TENSOR = r"layers\.0\.self_attn\.k_proj\.weight$"  # 512 weights in the tiny Llama


def test_masked_q_direction_estimate_expects_the_masked_gradient(tokenizer, examples):
    """E[Σ_i c_i z_i] with c_i = g_i/q, z_i supported on the mask, is the gradient restricted to the mask."""
    model = tiny_model("llama", len(tokenizer))
    config = RunConfig(method="zo-full", zo_params=ONE_TENSOR, zo_q=200, eps=1e-2, zo_dist="rademacher")
    model, groups = prepare(model, config)
    (_, p), = groups.zo
    mask = masks.build("magnitude", groups.zo, density=1 / 32)  # k = 16: E cos ≈ (1 + 15/q)^-1/2 = 0.96
    method = METHODS["zo-full"].rule(model, groups, Objective(model, tokenizer, config), config, total=1, mask=mask)
    batch = method.objective.encode(examples)
    directions, _, _ = method.estimate(batch)
    estimate = sum(c * method.engine.direction(0, seed) for seed, c in directions)

    model.eval()
    p.requires_grad_(True)
    method.objective(batch).backward()
    on = torch.zeros(p.numel(), dtype=torch.bool)
    on[mask[0]] = True
    true = p.grad.flatten() * on
    assert torch.all(estimate.flatten()[~on] == 0)  # nothing off the mask
    cos = torch.nn.functional.cosine_similarity(estimate.flatten(), true, dim=0)
    assert cos > 0.9, f"cosine {cos:.3f}"
    assert estimate.norm() == pytest.approx(true.norm().item(), rel=0.2)  # E|est|² = |∇|²(1 + (k−1)/q)


def test_mask_rules_pick_smallest_weights_and_largest_squared_gradients(tokenizer, examples):
    model = tiny_model("llama", len(tokenizer))
    params = select_params(model, ONE_TENSOR)
    (_, p), = params
    smallest = masks.build("magnitude", params, density=0.1)[0]
    assert smallest.numel() == round(0.1 * p.numel()) and torch.equal(smallest, smallest.sort().values)
    assert p.detach().flatten().abs()[smallest].max() <= p.detach().flatten().abs().kthvalue(smallest.numel() + 1)[0]

    config = RunConfig(method="zo-full")
    objective = Objective(model, tokenizer, config)
    for q in model.parameters():
        q.requires_grad_(False)
    chosen = masks.build("sensitivity", params, 0.1, loss=lambda b: objective(objective.encode(examples)), batches=2)
    assert p.grad is None and not p.requires_grad  # scores only: no gradient is left behind
    p.requires_grad_(True)
    objective(objective.encode(examples)).backward()
    score = (2 * p.grad.flatten()).square()  # two identical batches
    expected = torch.topk(score, chosen[0].numel()).indices.sort().values
    assert torch.equal(chosen[0], expected)


def test_sensitivity_mask_leaves_no_gradient_on_the_fo_group(tokenizer, examples):
    """The mask's backward passes go into θ's scores only: φ starts its first step with no gradient."""
    config = RunConfig(method="hybrid")
    model, groups = prepare(tiny_model("llama", len(tokenizer)), config)
    objective = Objective(model, tokenizer, config)
    masks.build("sensitivity", groups.zo, 0.1, loss=lambda b: objective(objective.encode(examples)), batches=2)
    assert groups.fo and all(p.grad is None for _, p in groups.fo)
    assert all(p.grad is None for _, p in groups.zo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_perturbation_is_exact_and_matches_the_dense_direction(dtype, tokenizer):
    model = tiny_model("llama", len(tokenizer)).to(dtype)
    params = select_params(model)
    full = [torch.arange(p.numel()) for _, p in params]
    sparse, dense = SparseEngine(model, params, full, "gaussian"), ZOEngine(model, params, "gaussian")
    assert torch.equal(sparse.direction(3, 7).to(dtype), dense.direction(3, 7).to(dtype))
    before = [p.detach().clone() for _, p in params]
    with sparse.perturbed(7, 1e-2):
        assert not torch.equal(params[3][1], before[3])
    sparse.shift_(7, 1e-2)
    sparse.shift_(7, -2e-2)
    assert torch.equal(sparse._saved[3], before[3].flatten())
    from hyft.engine.zo import ZOUpdate

    sparse.update(ZOUpdate(0, 7, 0.0, 0.0, shifts=(1e-2, -2e-2, 1e-2)))
    for (_, p), b in zip(params, before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("two_sided", [True, False])
def test_sparse_and_dense_low_precision_updates_mean_the_same(two_sided, tokenizer):
    """bf16: a sparse engine whose mask is every position updates bitwise as the dense engine does, along
    the direction the SPSA points applied (not z). Without residuals: the dense one keeps them in the weight's
    dtype, the sparse one in float32 (k values only)."""
    from hyft.engine.zmath import Applied
    from hyft.engine.zo import ZOUpdate

    a, b = (tiny_model("llama", len(tokenizer)).to(torch.bfloat16) for _ in range(2))
    pa, pb = select_params(a), select_params(b)
    sparse = SparseEngine(a, pa, [torch.arange(p.numel()) for _, p in pa], "gaussian", compensate=False,
                          applied=Applied(1e-2, two_sided))
    dense = ZOEngine(b, pb, "gaussian", eps=1e-2, two_sided=two_sided, compensate=False)
    for step in range(3):
        for engine in (sparse, dense):
            engine.update(ZOUpdate(step, 11 + step, 3.0, lr=1e-3))
    for (n, p), (_, q) in zip(pa, pb, strict=True):
        assert torch.equal(p, q), n


def test_estimators_combine_as_documented():
    assert mean([1.0, 3.0]) == [0.5, 1.5]
    c = normalized([1.0, 3.0, 5.0])
    std = (8 / 3) ** 0.5
    assert c == pytest.approx([1 / (3 * std), 3 / (3 * std), 5 / (3 * std)])
    assert normalized([2.0, 2.0]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="at least 2"):
        normalized([1.0])
    with pytest.raises(HyftError, match="zo_q >= 2"):
        RunConfig(zo_combine="normalized").validate()


@pytest.mark.parametrize("method,rule", [("zo-full", "sensitivity"), ("hybrid", "magnitude")])
def test_masked_q_direction_run_replays_bitwise(method, rule, tiny_dir, tmp_path):
    config = RunConfig(model=tiny_dir, method=method, task="sst2", num_train=16, num_dev=8, num_test=8, steps=4,
                       batch_size=4, eval_every=2, lr_zo=1e-2, zero_shot=False, zo_mask=rule, zo_density=0.05,
                       zo_q=2, zo_combine="normalized", mask_batches=2)
    out = tmp_path / "run"
    trainer = Trainer(config, out, progress=False)
    trainer.run()
    assert len((out / "zo_log.jsonl").read_text().splitlines()) == 1 + 2 * 4  # header + q lines per step
    final = trainer  # the best-dev state is restored at the end: replay up to its index
    best = __import__("json").loads((out / "results.json").read_text())["zo_log_best_index"]
    model = replay(tiny_dir, out / "zo_log.jsonl", upto=best, log=lambda *_: None)
    trained = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
               for n, p in final.model.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name]), name
