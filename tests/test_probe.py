"""``hyft probe``: the curvature it measures is the Hessian's (checked against exact Hessian-vector
products on a tiny model), its rates follow the quadratic model, and ``--auto-lr`` writes them to the run."""

from __future__ import annotations

import json

import pytest
import torch

from hyft.config import RunConfig
from hyft.methods import METHODS, Objective
from hyft.methods.params import prepare
from hyft.training.probe import fo_direction, probe
from tests.conftest import tiny_model


def setup(tokenizer, optimizer: str = "sgd"):
    config = RunConfig(method="hybrid", optimizer_fo=optimizer, eps=1e-2, lora_targets=["q_proj", "v_proj"])
    model = tiny_model("llama", len(tokenizer))
    model.set_attn_implementation("eager")  # double backward (exact Hessian-vector products) for the checks
    model, groups = prepare(model, config)
    with torch.no_grad():  # a LoRA away from its zero start, so that φ's curvature is not degenerate
        for _, p in groups.fo:
            p.normal_(0, 0.2)
    method = METHODS["hybrid"].rule(model, groups, Objective(model, tokenizer, config), config, total=1)
    return method


def hvp(method, params, batch, v):
    """Exact H·v of the eval-mode loss w.r.t. ``params`` (double backward)."""
    method.model.eval()
    loss = method.objective(batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.flatten() for g in grads])
    hv = torch.autograd.grad(flat @ v, params)
    return flat.detach(), torch.cat([h.flatten() for h in hv])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fo_rate_is_the_quadratic_models_step_along_the_optimizers_direction(optimizer, tokenizer, examples):
    method = setup(tokenizer, optimizer)
    batch = method.objective.encode(examples)
    result = probe(method, [batch], directions=1, eps=1e-2)
    params = [p for _, p in method.groups.fo]
    grad, _ = hvp(method, params, batch, torch.zeros(sum(p.numel() for p in params)))
    u = fo_direction(grad, optimizer)
    _, hu = hvp(method, params, batch, u)
    assert result.fo_curvature == pytest.approx(float(u @ hu) / float(u @ u), rel=0.05)
    assert result.fo_slope == pytest.approx(float(grad @ u), rel=1e-3)
    if u @ hu > 0:
        assert result.lr_fo_quadratic == pytest.approx(float(grad @ u) / float(u @ hu), rel=0.05)
        losses = dict(map(tuple, result.fo_line_search))  # the suggestion is the line search's best point
        assert result.lr_fo == min(losses, key=losses.get)
        assert {round(result.lr_fo_quadratic / lr) for lr in losses} == {1, 3, 10, 30, 100}
    else:  # no positive curvature along the step: no suggestion rather than a negative rate
        assert result.lr_fo is None


def test_zo_curvature_is_the_directional_second_derivative(tokenizer, examples):
    """With one direction, E[g² c]/E[g²] is c = zᵀHz, measured by finite differences of the loss."""
    method = setup(tokenizer)
    batch = method.objective.encode(examples)
    state = method.seeds.get_state()
    result = probe(method, [batch], directions=1, eps=1e-2)
    method.seeds.set_state(state)
    seed = method.next_seed()  # the direction the probe drew
    params = [p for _, p in method.engine.params]
    z = torch.cat([method.engine.direction(i, seed).flatten() for i in range(len(params))])
    for p in params:
        p.requires_grad_(True)
    _, hz = hvp(method, params, batch, z)
    for p in params:
        p.requires_grad_(False)
    assert result.zo_curvature == pytest.approx(float(z @ hz), rel=0.05)
    if z @ hz > 0:
        assert result.lr_zo_quadratic == pytest.approx(1 / float(z @ hz), rel=0.05)
        assert result.lr_zo == min(result.lr_zo_quadratic, 1e-2 / result.zo_slope_sq ** 0.5)
    else:  # a saddle direction: no suggestion rather than a negative rate
        assert result.lr_zo is None
    low, high = result.eps_window
    assert low < high and low <= result.eps <= high


@pytest.mark.parametrize("dist", ["rademacher", "lowrank"])
def test_auto_lr_writes_the_probed_rates_to_the_run(dist, tiny_dir, tmp_path):
    from hyft.cli import main

    out = tmp_path / "run"
    code = main(["train", "--model", tiny_dir, "--method", "hybrid", "--task", "sst2", "--num-train", "16",
                 "--num-dev", "8", "--num-test", "8", "--steps", "2", "--batch-size", "4", "--no-zero-shot",
                 "--auto-lr", "--zo-dist", dist, "--out", str(out), "--no-progress"])
    assert code == 0
    probed = json.loads((out / "probe.json").read_text())
    stored = RunConfig.from_yaml(out / "config.yaml")
    assert stored.lr_fo == pytest.approx(probed["lr_fo"], rel=1e-2) and stored.lr_fo != RunConfig().lr_fo
    assert stored.lr_zo == pytest.approx(probed["lr_zo"], rel=1e-2) and stored.lr_zo != RunConfig().lr_zo
    assert json.loads((out / "results.json").read_text())["lr_zo"] == stored.lr_zo


def test_the_probe_command_prints_the_rates_it_writes(tiny_dir, tmp_path, capsys):
    """`hyft probe` on a tiny model: its "suggested:" flags are the measured rates of its --json file."""
    from hyft.cli import main

    out = tmp_path / "probe.json"
    code = main(["probe", "--model", tiny_dir, "--method", "hybrid", "--task", "sst2", "--num-train", "16",
                 "--batch-size", "4", "--json", str(out)])
    assert code == 0
    measured = json.loads(out.read_text())
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("suggested: "))
    flags = line.removeprefix("suggested: ").split()
    printed = {flags[i].removeprefix("--").replace("-", "_"): float(flags[i + 1]) for i in range(0, len(flags), 2)}
    expected = {k: measured[k] for k in ("lr_zo", "lr_fo", "eps") if measured.get(k) is not None}
    assert printed.keys() == expected.keys() == {"lr_zo", "lr_fo", "eps"}
    for key, value in expected.items():
        assert printed[key] == pytest.approx(value, rel=5e-3)
