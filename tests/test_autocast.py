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


@pytest.mark.parametrize(("fused", "dist"), [(False, "gaussian"), (True, "gaussian"), (True, "lowrank")])
def test_autocast_computes_every_forward_of_a_hybrid_step_in_bfloat16_over_float32_weights(tokenizer, examples,
                                                                                          fused, dist):
    config = RunConfig(method="hybrid", autocast="bfloat16", fused=fused, zo_dist=dist, lr_zo=1e-3,
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


def test_a_training_run_evaluates_under_its_autocast(tiny_dir, tmp_path, monkeypatch):
    """The loop hands its autocast to every evaluation: zero-shot, dev and test (low-rank: after updates,
    whose A Vᵀ term the unperturbed forwards add)."""
    import hyft.training.loop as loop

    asked, real = [], loop.evaluate_task
    monkeypatch.setattr(loop, "evaluate_task", lambda *a, **kw: asked.append(kw.get("precision")) or real(*a, **kw))
    config = RunConfig(model=tiny_dir, task="sst2", num_train=16, num_dev=4, num_test=4, steps=4, batch_size=4,
                       eval_every=2, eval_batch_size=4, method="hybrid", zo_dist="lowrank", zo_lazy=2,
                       autocast="bfloat16", zero_shot=True).validate()
    loop.Trainer(config, tmp_path / "run", progress=False).run()
    assert asked == ["bfloat16"] * 4  # zero-shot, dev at steps 2 and 4, test


@pytest.mark.parametrize(("values", "message"), [
    (dict(dtype="bfloat16"), "use dtype float32"),
    (dict(autocast="float16"), "autocast must be none or bfloat16"),
    (dict(shard="fsdp"), "shard fsdp does not support autocast"),
    (dict(auto_lr=True), "auto_lr's ε window assumes float32"),
])
def test_autocast_refuses_what_it_does_not_support_in_one_line(values, message):
    with pytest.raises(HyftError, match=message):
        RunConfig(**{"autocast": "bfloat16", **values}).validate()
