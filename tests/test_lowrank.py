"""Low-rank directions (LOZO): the estimate along U Vᵀ, the pending-update term of the forwards, folds, and
bitwise rebuilds from the log and from a mid-period snapshot."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hyft.config import RunConfig
from hyft.engine.lowrank import LowRankEngine
from hyft.engine.zo import ZOUpdate, select_params
from hyft.errors import HyftError
from hyft.methods import METHODS
from hyft.methods.params import prepare
from hyft.training.snapshots import BaseSnapshots, rebuild
from tests.conftest import tiny_model

EPS = 1e-3


def quadratic(dtype=torch.float64):
    """L(W) = ½‖W x − y‖² + ½‖b‖²-free linear layer: a quadratic in W, so the two-sided SPSA difference is exact."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 8, bias=False).to(dtype)
    x, y = torch.randn(16, 6, dtype=dtype), torch.randn(16, 8, dtype=dtype)
    return layer, lambda: 0.5 * ((layer(x) - y) ** 2).sum()


def spsa(engine: LowRankEngine, loss, seed: int) -> float:
    with torch.no_grad():
        with engine.perturbed(seed, EPS):
            plus = loss().item()
        with engine.perturbed(seed, -EPS):
            minus = loss().item()
    return (plus - minus) / (2 * EPS)


def gradient(layer: nn.Linear, loss) -> torch.Tensor:
    layer.weight.requires_grad_(True)
    (g,) = torch.autograd.grad(loss(), layer.weight)
    layer.weight.requires_grad_(False)
    return g


def test_the_estimate_is_the_directional_derivative_along_u_vt_and_unbiased_on_a_quadratic():
    layer, loss = quadratic()
    grad = gradient(layer, loss)
    # V redrawn every step (lazy 1): over U and V, E[g z] = ∇L
    engine = LowRankEngine(layer, select_params(layer), rank=2, lazy=1, root=7)
    n = 3000
    total = torch.zeros_like(grad)
    for step in range(n):
        engine.begin(step)
        z = engine.direction(0, step).to(grad.dtype)
        g = spsa(engine, loss, step)
        # exact on a quadratic, up to z's float32 rounding (relative 1e-7 per entry, before cancellation)
        assert g == pytest.approx(float((grad * z).sum()), rel=0, abs=1e-6 * float(grad.norm() * z.norm()))
        total += g * z
    error = (total / n - grad).norm() / grad.norm()
    # Monte Carlo: the relative error of the mean of n estimates is about sqrt((d + 1)/n) ≈ 0.13 here;
    # a missing 1/√R (E[g z] = R ∇L) or a biased direction gives ≥ 1
    assert error < 0.3, error
    # V held (lazy ≫ n): E_U[g z | V] = ∇L V Vᵀ / R, the gradient projected on V's columns
    held = LowRankEngine(layer, select_params(layer), rank=2, lazy=10**9, root=7)
    held.begin(0)
    v = held.V.view(2, 6).T.to(grad.dtype)  # V is stored R × n
    total.zero_()
    for seed in range(n):
        total += spsa(held, loss, seed) * held.direction(0, seed).to(grad.dtype)
    projected = grad @ v @ v.T / 2
    assert ((total / n - projected).norm() / projected.norm()) < 0.3


def reference_losses(model: nn.Module, examples_ids: torch.Tensor, params: dict[str, torch.Tensor]) -> float:
    logits = functional_call(model, params, (examples_ids,)).logits
    return float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), examples_ids[:, 1:].flatten()))


def loss_of(model: nn.Module, ids: torch.Tensor) -> float:
    """The LM loss in the model's dtype (transformers' own loss upcasts to float32)."""
    return reference_losses(model, ids, dict(model.named_parameters()))


def test_a_low_rank_run_equals_a_dense_run_along_the_materialised_u_vt():
    """Eight SPSA steps with V held 3 steps (folds after steps 2 and 5, two updates still pending at the end)
    against plain weights moved by the materialised z = U Vᵀ/√R: every loss, coefficient and final weight
    agrees to rounding. A forward that leaves out the pending updates differs from step 1 on."""
    model = tiny_model("llama", 64).to(torch.float64)
    params = select_params(model)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = copy.deepcopy(model)  # no hooks: the reference's forwards
    engine = LowRankEngine(model, params, rank=2, lazy=3, root=11, eps=EPS)
    lr = 2e-3
    for step in range(8):
        engine.begin(step)
        seed = 1000 + step
        z = {name: engine.direction(i, seed).to(torch.float64) for i, (name, _) in enumerate(params)}
        with torch.no_grad():
            with engine.perturbed(seed, EPS):
                plus = loss_of(model, ids)
            with engine.perturbed(seed, -EPS):
                minus = loss_of(model, ids)
            unperturbed = loss_of(model, ids)
        ref_plus = reference_losses(plain, ids, {n: w + EPS * z[n] for n, w in reference.items()})
        ref_minus = reference_losses(plain, ids, {n: w - EPS * z[n] for n, w in reference.items()})
        assert unperturbed == pytest.approx(reference_losses(plain, ids, reference), rel=1e-7)
        assert (plus, minus) == pytest.approx((ref_plus, ref_minus), rel=1e-7)  # z and A are float32
        g = (plus - minus) / (2 * EPS)
        engine.update(ZOUpdate(step, seed, g, lr))
        reference = {n: w - lr * g * z[n] for n, w in reference.items()}
    assert engine._dirty  # updates of the last period are pending, not yet in the weights
    engine.materialize()
    for name, p in model.named_parameters():
        assert torch.allclose(p, reference[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbations_never_write_the_weights_and_a_zero_step_changes_nothing(dtype):
    model = tiny_model("llama", 64).to(dtype)
    params = select_params(model)
    before = {n: p.detach().clone() for n, p in params}
    engine = LowRankEngine(model, params, rank=2, lazy=2, root=3, eps=EPS)
    ids = torch.randint(0, 64, (2, 8))
    for step in range(4):
        engine.begin(step)
        with torch.no_grad(), engine.perturbed(step, EPS):
            model(ids)
        engine.shift_(step, EPS)
        engine.shift_(step, -2 * EPS)
        with torch.no_grad():
            model(ids)
        engine.update(ZOUpdate(step, step, 1.0, lr=0.0, shifts=(EPS, -2 * EPS, EPS)))
    engine.materialize()
    for name, p in params:
        assert torch.equal(p, before[name]), name


def test_a_forward_that_raises_leaves_no_perturbed_vector_in_the_model():
    """The vectors' perturbed values are swapped in for a forward; one that raises midway must not leave them."""
    model = tiny_model("llama", 64)
    params = select_params(model)
    engine = LowRankEngine(model, params, rank=2, lazy=2, root=3, eps=EPS)
    norm = model.model.layers[0].input_layernorm
    stored = norm._parameters["weight"]
    handle = norm.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.begin(0)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), engine.perturbed(0, EPS):
        model(torch.randint(0, 64, (2, 8)))
    handle.remove()
    assert norm._parameters["weight"] is stored


def bf16_method(tokenizer, lazy: int):
    config = RunConfig(method="zo-full", zo_dist="lowrank", zo_rank=2, zo_lazy=lazy, lr_zo=1e-2, eps=1e-2,
                       loss="lm", dtype="bfloat16").validate()
    model, groups = prepare(tiny_model("llama", len(tokenizer)).to(torch.bfloat16), config)
    from hyft.methods import Objective
    rule = METHODS["zo-full"].rule
    return rule(model, groups, Objective(model, tokenizer, config), config, total=10), config


def test_bf16_rebuilds_bitwise_from_the_log_and_from_a_mid_period_snapshot(tokenizer, examples, tmp_path):
    """bf16 weights, a float32 accumulator: a snapshot taken mid-period (A pending) plus the rest of the log,
    and the original weights plus the whole log, both give the run's weights, residuals and accumulator."""
    method, _ = bf16_method(tokenizer, lazy=4)
    snapshots = BaseSnapshots(tmp_path)
    updates = []
    for step in range(10):
        updates += method.step(examples, step).zo_updates
        if step == 5:
            snapshots.write(method.engine, len(updates))
    final = {k: v.clone() for k, v in method.engine.state_tensors().items()}
    assert final["#lowrank.A"].abs().max() > 0  # steps 8, 9 pending
    assert any(k.endswith("#residual") and v.abs().max() > 0 for k, v in final.items())
    for store, replayed in [(BaseSnapshots(tmp_path / "none"), 10), (snapshots, 4)]:
        fresh, _ = bf16_method(tokenizer, lazy=4)
        assert rebuild(fresh.engine, store, updates, 10, original=None) == replayed
        for key, value in fresh.engine.state_tensors().items():
            assert torch.equal(value, final[key]), key


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(zo_mask="magnitude"), "does not support zo_mask"),
    (dict(weight_decay_zo=0.1), "does not support weight_decay_zo"),
    (dict(zo_rank=0), "zo_rank must be >= 1"),
    (dict(zo_rounding="stochastic", dtype="bfloat16"), "zo_rounding nearest"),
])
def test_unsupported_low_rank_combinations_are_refused_in_one_line(overrides, message):
    with pytest.raises(HyftError, match=message) as err:
        RunConfig(method="zo-full", zo_dist="lowrank", **overrides).validate()
    assert "\n" not in str(err.value)


def test_matrices_other_modules_read_are_refused():
    """GPT-2's Conv1D computes x W + b with W (in, out): not a layer the low-rank term can follow."""
    model = tiny_model("gpt2", 64)
    with pytest.raises(HyftError, match="nn.Linear or nn.Embedding"):
        LowRankEngine(model, select_params(model), rank=2, lazy=2, root=0)


def test_rank_one_direction_has_unit_scale():
    """z = U Vᵀ/√R has unit variance per entry whatever R (E[z zᵀ] = I)."""
    layer = nn.Linear(512, 512, bias=False)
    for rank in (1, 4):
        engine = LowRankEngine(layer, select_params(layer), rank=rank, lazy=1, root=5)
        engine.begin(0)
        z = engine.direction(0, 0)
        assert z.pow(2).mean().item() == pytest.approx(1.0, abs=0.1 * math.sqrt(4 / rank))
