"""Low precision that learns: in bf16 the ZO updates accumulate (Kahan residual) and follow the direction the
perturbed forwards actually applied, the run tracks its fp32 twin, and replay stays bitwise."""

from __future__ import annotations

import pytest
import torch

from hyft.config import RunConfig
from hyft.engine import zmath
from hyft.engine.zo import ZOEngine, select_params
from hyft.errors import HyftError
from hyft.methods import METHODS, Objective
from hyft.methods.params import prepare
from hyft.training.snapshots import BaseSnapshots, rebuild
from tests.conftest import tiny_model


def zo_run(tokenizer, examples, dtype, lr, steps, compensate=True, rounding="nearest"):
    model = tiny_model("llama", len(tokenizer)).to(dtype)
    config = RunConfig(method="zo-full", lr_zo=lr, eps=1e-3, zo_compensate=compensate, zo_rounding=rounding)
    model, groups = prepare(model, config)
    start = [p.detach().float().clone() for _, p in groups.zo]
    method = METHODS["zo-full"].rule(model, groups, Objective(model, tokenizer, config), config, total=steps)
    stats = [method.step(examples, i) for i in range(steps)]
    true = [p.detach().float() + (0 if r is None else r.float()) for (_, p), r in
            zip(groups.zo, method.engine.residuals, strict=True)]
    moved = torch.cat([(t - s).abs().flatten() for t, s in zip(true, start, strict=True)]).mean().item()
    return moved, [s.loss for s in stats], method, model


def test_bf16_updates_below_the_ulp_accumulate(tokenizer, examples):
    """At η·g·z ≈ 3e-6, far below the ulp of weights ≈ 0.02 (1.2e-4), a bf16 run moves its weights as far
    as the fp32 run (within 2×); without the residual the updates round away."""
    fp32, *_ = zo_run(tokenizer, examples, torch.float32, 1e-6, 5)
    bf16, *_ = zo_run(tokenizer, examples, torch.bfloat16, 1e-6, 5)
    rounded, *_ = zo_run(tokenizer, examples, torch.bfloat16, 1e-6, 5, compensate=False)
    assert fp32 / 2 <= bf16 <= 2 * fp32, (fp32, bf16)
    assert rounded < fp32 / 4, (fp32, rounded)


def test_bf16_loss_curve_tracks_fp32(tokenizer, examples):
    """Stated tolerance: over 20 zo-full steps the bf16 losses stay within 0.02 of the fp32 losses."""
    _, fp32, *_ = zo_run(tokenizer, examples, torch.float32, 3e-3, 20)
    _, bf16, *_ = zo_run(tokenizer, examples, torch.bfloat16, 3e-3, 20)
    assert fp32[-1] < fp32[0] - 0.05  # it learns
    assert max(abs(a - b) for a, b in zip(fp32, bf16, strict=True)) < 0.02


def test_bf16_replay_with_residuals_is_bitwise(tokenizer, examples, tmp_path):
    """Weights and residuals after bf16 steps are rebuilt exactly: from the original plus the log, and from a
    snapshot (which holds the residuals) plus the rest of the log."""
    _, _, method, _ = zo_run(tokenizer, examples, torch.bfloat16, 1e-4, 0)
    snapshots = BaseSnapshots(tmp_path)
    updates = [method.step(examples, i).zo_updates[0] for i in range(3)]
    snapshots.write(method.engine, 3)
    updates += [method.step(examples, i).zo_updates[0] for i in range(3, 6)]
    final = {k: v.clone() for k, v in method.engine.state_tensors().items()}
    assert any(k.endswith("#residual") and v.abs().max() > 0 for k, v in final.items())

    def fresh_engine() -> ZOEngine:
        model, groups = prepare(tiny_model("llama", len(tokenizer)).to(torch.bfloat16), RunConfig(method="zo-full"))
        return ZOEngine(model, groups.zo, method.engine.dist, eps=1e-3, two_sided=True)

    for store, replayed in [(BaseSnapshots(tmp_path / "none"), 6), (snapshots, 3)]:
        engine = fresh_engine()
        assert rebuild(engine, store, updates, 6, original=None) == replayed
        for key, value in engine.state_tensors().items():
            assert torch.equal(value, final[key]), key


def test_perturbation_that_rounds_away_is_not_applied():
    """Norm-like weights at 1.0 in bf16 with ε = 1e-3: θ ± εz rounds back to θ for most coordinates, so the
    applied direction is 0 there and the update leaves them; plain z would move every one."""
    p = torch.ones(8192, dtype=torch.bfloat16)
    applied = p.clone()
    zmath.update_([zmath.Target(applied, torch.zeros_like(p), 3)], 1e-3, 0.0, "gaussian", zmath.Applied(1e-3, True))
    plain_r = torch.zeros_like(p)
    plain = p.clone()
    zmath.update_([zmath.Target(plain, plain_r, 3)], 1e-3, 0.0, "gaussian", None)
    moved_applied = ((applied.float() - 1) != 0).float().mean().item()
    moved_plain = ((plain.float() + plain_r.float() - 1) != 0).float().mean().item()
    assert moved_applied < 0.05 and moved_plain > 0.95


@pytest.mark.parametrize("two_sided", [True, False])
def test_applied_direction_equals_z_where_the_perturbation_is_resolved(two_sided):
    """For weights whose ulp is far below ε·z the applied direction is z up to the rounding of θ ± εz."""
    p = torch.full((8192,), 0.02, dtype=torch.bfloat16)
    q = p.clone()
    r = torch.zeros_like(p)
    zmath.update_([zmath.Target(q, r, 5)], 1e-4, 0.0, "gaussian", zmath.Applied(1e-2, two_sided))
    z = zmath.noise.direction(p.shape, 5, "gaussian", p.device)
    step = (q.float() + r.float()) - p.float()
    assert torch.allclose(step, -1e-4 * z, atol=1e-4 * 0.02 * (1 if two_sided else 2), rtol=0.02)


def test_bf16_run_leaves_unresolved_norm_weights_alone(tokenizer, examples):
    """Through the engine: at ε = 1e-3, 1.0 ± εz rounds back to 1.0 in bf16 unless εz passes half an ulp
    (z > 3.9 or z < −1.95: ~5 % of coordinates per two-sided step), so one zo-full step leaves ~95 % of the
    norm weights alone; plain z would move all of them."""
    _, _, method, _ = zo_run(tokenizer, examples, torch.bfloat16, 1e-3, 1)
    changed = [((p.float() + r.float()) != 1.0).flatten() for (name, p), r in
               zip(method.engine.params, method.engine.residuals, strict=True) if "norm" in name]
    assert torch.cat(changed).float().mean().item() < 0.12


def test_stochastic_rounding_is_unbiased_seeded_and_picks_a_neighbour():
    """Each value goes to the bf16 just below or above it, up with probability equal to its position between
    them, so the mean is exact; the bits come from the seed (same seed, same result) and the position."""
    down = torch.full((200_000,), 0.02, dtype=torch.bfloat16).float()
    up = torch.nextafter(down.bfloat16(), torch.tensor(1.0, dtype=torch.bfloat16)).float()
    for sign in (1.0, -1.0):
        x = sign * (down + 0.3 * (up - down))
        out = torch.empty_like(x, dtype=torch.bfloat16)
        zmath.stochastic_round_(out, x.clone(), seed=9, start=0)
        assert torch.all((out.float() == sign * down) | (out.float() == sign * up))
        assert abs((out.float() - x).mean().item()) < 0.01 * (up - down)[0].item()
        again = torch.empty_like(out)
        zmath.stochastic_round_(again, x.clone(), seed=9, start=0)
        assert torch.equal(out, again)
        other = torch.empty_like(out)
        zmath.stochastic_round_(other, x.clone(), seed=10, start=0)
        assert not torch.equal(out, other)


def test_bf16_stochastic_rounding_learns_without_a_residual_and_replays_bitwise(tokenizer, examples):
    """zo_rounding=stochastic: no residual buffer; the weights move along the fp32 run's displacement by the
    same amount on average (the projection ratio is ~1; mean |Δθ| is larger, by the rounding noise, which
    does not cancel over few steps), and the same updates applied to a fresh copy give bitwise the same
    weights."""
    def displacement(dtype, rounding):
        _, _, method, _ = zo_run(tokenizer, examples, dtype, 1e-6, 0, rounding=rounding)
        start = torch.cat([p.detach().float().flatten() for _, p in method.engine.params])
        for i in range(5):
            method.step(examples, i)
        assert all(r is None for r in method.engine.residuals) or rounding == "nearest"
        return torch.cat([p.detach().float().flatten() for _, p in method.engine.params]) - start

    fp32 = displacement(torch.float32, "nearest")
    sr = displacement(torch.bfloat16, "stochastic")
    rounded = displacement(torch.bfloat16, "nearest")  # residual kept, so stored weights lag behind
    ratio = (sr @ fp32 / (fp32 @ fp32)).item()
    assert 0.7 < ratio < 1.3, ratio
    assert (rounded @ fp32 / (fp32 @ fp32)).item() < ratio  # stored bf16 weights without SR move less

    _, _, method, _ = zo_run(tokenizer, examples, torch.bfloat16, 1e-4, 0, rounding="stochastic")
    updates = [method.step(examples, i).zo_updates[0] for i in range(3)]
    model, groups = prepare(tiny_model("llama", len(tokenizer)).to(torch.bfloat16), RunConfig(method="zo-full"))
    fresh = ZOEngine(model, groups.zo, method.engine.dist, eps=1e-3, two_sided=True, rounding="stochastic")
    for u in updates:
        fresh.update(u)
    for (_, a), (_, b) in zip(fresh.params, method.engine.params, strict=True):
        assert torch.equal(a, b)


def test_the_engine_refuses_an_unknown_rounding_or_stochastic_fp16(tokenizer):
    model, groups = prepare(tiny_model("llama", len(tokenizer)), RunConfig(method="zo-full"))
    with pytest.raises(ValueError, match="unknown rounding"):
        ZOEngine(model, groups.zo, "gaussian", rounding="stochastik")
    model, groups = prepare(tiny_model("llama", len(tokenizer)).half(), RunConfig(method="zo-full"))
    with pytest.raises(ValueError, match="not float16"):
        ZOEngine(model, groups.zo, "gaussian", rounding="stochastic")


def test_a_residual_of_the_wrong_size_is_refused_in_one_line():
    """A checkpoint whose residual does not cover the whole weight (an older sharded one kept rank 0's rows)."""
    model = tiny_model("llama", 64).to(torch.bfloat16)
    params = select_params(model)
    engine = ZOEngine(model, params)
    whole = engine.whole_residuals()
    assert all(w is not None and w.shape == p.shape for w, (_, p) in zip(whole, params, strict=True))
    engine.load_whole_residuals(whole)
    with pytest.raises(HyftError, match="cannot be resumed"):
        engine.load_whole_residuals([w.reshape(-1)[: w.numel() // 2] for w in whole])
