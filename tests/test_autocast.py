"""Mixed precision (``--autocast``): every forward of a step (the FO pass and each SPSA point) and every
evaluation computes in bfloat16, while the weights, their gradients and the updates stay float32."""

from __future__ import annotations

import pytest
import torch

from hyft.config import RunConfig
from hyft.errors import HyftError
from hyft.methods import METHODS, Objective
from hyft.methods.params import prepare
from hyft.tasks import get_task
from hyft.tasks.evaluate import evaluate_task
from tests.conftest import tiny_model


def record_forward_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """The output dtype of the first decoder block's MLP projection at every forward."""
    seen: list[torch.dtype] = []
    layer = next(m for name, m in model.named_modules() if name.endswith("mlp.down_proj"))
    layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("fused", [False, True])
def test_autocast_computes_every_forward_of_a_hybrid_step_in_bfloat16_over_float32_weights(tokenizer, examples,
                                                                                          fused):
    config = RunConfig(method="hybrid", autocast="bfloat16", fused=fused, zo_dist="gaussian", lr_zo=1e-3,
                       lr_fo=1e-2).validate()
    model, groups = prepare(tiny_model("llama", len(tokenizer)), config)
    seen = record_forward_dtypes(model)
    before = [p.detach().clone() for _, p in groups.zo]
    method = METHODS["hybrid"].rule(model, groups, Objective(model, tokenizer, config), config, total=2)
    method.step(examples, 0)  # the first step also checks once that train mode is eval mode (two forwards)
    seen.clear()
    method.step(examples, 1)
    assert seen == [torch.bfloat16] * (2 if fused else 3)  # the FO pass and both SPSA points (fused: one fewer)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for _, p in groups.fo)
    assert any(not torch.equal(b, p) for b, (_, p) in zip(before, groups.zo, strict=True))  # θ moved, in fp32


def test_without_autocast_the_forwards_stay_float32(tokenizer, examples):
    config = RunConfig(method="hybrid", fused=False).validate()
    model, groups = prepare(tiny_model("llama", len(tokenizer)), config)
    seen = record_forward_dtypes(model)
    METHODS["hybrid"].rule(model, groups, Objective(model, tokenizer, config), config, total=1).step(examples, 0)
    assert set(seen) == {torch.float32}


def test_evaluation_runs_under_the_runs_autocast(tokenizer, examples):
    model = tiny_model("llama", len(tokenizer))
    seen = record_forward_dtypes(model)
    plain = evaluate_task(model, tokenizer, get_task("sst2"), examples, progress=False)
    assert set(seen) == {torch.float32}
    seen.clear()
    mixed = evaluate_task(model, tokenizer, get_task("sst2"), examples, progress=False, precision="bfloat16")
    assert seen and set(seen) == {torch.bfloat16}
    assert mixed.n == plain.n


def test_autocast_needs_float32_weights_and_a_known_precision():
    with pytest.raises(HyftError, match="use dtype float32"):
        RunConfig(autocast="bfloat16", dtype="bfloat16").validate()
    with pytest.raises(HyftError, match="autocast must be"):
        RunConfig(autocast="fp8").validate()
