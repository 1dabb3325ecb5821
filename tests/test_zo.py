"""The perturbation engine: SPSA against the true directional derivative, exact restore in every dtype,
tied embeddings streamed and perturbed once, direction statistics, and the update rule."""

from __future__ import annotations

import pytest
import torch

from hyft import noise
from hyft.config import RunConfig
from hyft.methods import METHODS, Objective
from hyft.params import prepare
from hyft.scoring import candidate_scores, classification_loss, encode
from hyft.zo import ZOEngine, ZOUpdate, select_params
from tests.conftest import tiny_model


def loss_fn(model, batch):
    return classification_loss(candidate_scores(model, batch), batch.gold)


# ε per architecture: small enough that the O(ε²) truncation is negligible for the random OPT (whose curvature
# is large), large enough for Llama, whose RMSNorm runs in float32 even for float64 weights.
@pytest.mark.parametrize("arch,eps", [("llama", 1e-5), ("opt", 1e-6), ("gpt2", 1e-6)])
def test_spsa_matches_directional_derivative(arch, eps, tokenizer, examples):
    """Two-sided SPSA equals z·∇L per seed, in float64, to a stated tolerance."""
    model = tiny_model(arch, len(tokenizer)).double()
    batch = encode(tokenizer, examples)
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    params = select_params(model)
    engine = ZOEngine(model, params)
    errors, sizes = [], []
    for seed in range(20):
        with torch.no_grad():
            with engine.perturbed(seed, eps):
                plus = loss_fn(model, batch).item()
            with engine.perturbed(seed, -eps):
                minus = loss_fn(model, batch).item()
        g = (plus - minus) / (2 * eps)
        exact = sum((engine.direction(i, seed).double() * gr).sum().item() for i, gr in enumerate(grads))
        errors.append(abs(g - exact))
        sizes.append(abs(exact))
    # stated tolerance: mean absolute error below 1e-3 of the mean |z·∇L| over 20 seeds
    assert sum(errors) / sum(sizes) < 1e-3, (errors, sizes)


def test_spsa_estimate_is_unbiased_on_a_quadratic():
    """E[g z] = ∇L: averaged over many seeds the estimate approaches the true gradient."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 1, bias=False)
    target = torch.randn(8)
    x = torch.eye(8)
    loss = lambda: 0.5 * ((layer(x).squeeze(-1) - target) ** 2).sum()  # noqa: E731
    true_grad = torch.autograd.grad(loss(), layer.weight)[0].flatten()
    engine = ZOEngine(layer, [("weight", layer.weight)])
    total = torch.zeros(8)
    n = 4000
    with torch.no_grad():
        for seed in range(n):
            with engine.perturbed(seed, 1e-3):
                plus = loss().item()
            with engine.perturbed(seed, -1e-3):
                minus = loss().item()
            total += (plus - minus) / 2e-3 * engine.direction(0, seed).flatten()
    estimate = total / n
    assert torch.nn.functional.cosine_similarity(estimate, true_grad, dim=0) > 0.97
    assert (estimate - true_grad).norm() / true_grad.norm() < 0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_perturbed_forward_leaves_weights_bitwise_unchanged(dtype, tokenizer, examples):
    model = tiny_model("llama", len(tokenizer)).to(dtype)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    engine = ZOEngine(model, select_params(model))
    batch = encode(tokenizer, examples)
    with torch.no_grad():
        clean = candidate_scores(model, batch)
        for seed in range(3):
            for scale in (1e-3, -1e-3):
                with engine.perturbed(seed, scale):
                    perturbed = candidate_scores(model, batch)
                assert not torch.equal(perturbed, clean)  # the forward did see θ + εz
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
    with torch.no_grad():
        assert torch.equal(candidate_scores(model, batch), clean)


def test_mezo_in_place_sequence_drifts_in_bf16(tokenizer):
    """Why the engine never writes θ during the estimate: MeZO's +ε, −2ε, +ε in place is not exact."""
    model = tiny_model("llama", len(tokenizer)).to(torch.bfloat16)
    p = model.model.layers[0].mlp.up_proj.weight
    before = p.detach().clone()
    z = noise.direction(p.shape, 0, "gaussian", p.device).to(p.dtype)
    with torch.no_grad():
        for scale in (1e-3, -2e-3, 1e-3):
            p.add_(z, alpha=scale)
    assert not torch.equal(p, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["hybrid", "zo-full", "zo-peft"])
def test_zo_step_with_zero_learning_rate_is_exact(method, dtype, tokenizer, examples):
    model = tiny_model("llama", len(tokenizer)).to(dtype)
    config = RunConfig(method=method, lr_zo=0.0, lr_fo=0.0, eps=1e-3, loss="classification")
    model, groups = prepare(model, config)
    before = [p.detach().clone() for _, p in groups.zo]
    m = METHODS[method](model, groups, Objective(model, tokenizer, config), config, total=3)
    for step in range(3):
        stats = m.step(examples, step)
        assert stats.zo_coef is not None and stats.zo_coef != 0.0
    for (_, p), b in zip(groups.zo, before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_tied_embedding_is_streamed_and_perturbed_once_consistently(arch, tokenizer, examples, monkeypatch):
    """The tied embedding/LM head is never made whole, and the perturbed forward equals the forward of a
    copy whose every weight (the tied one once) is set to θ + εz."""
    from hyft import zo

    model = tiny_model(arch, len(tokenizer))
    tied = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is tied
    params = select_params(model)
    assert sum(1 for _, q in params if q is tied) == 1  # one tensor, one direction
    engine = ZOEngine(model, params)
    assert set(engine.streamed.values()) == {next(i for i, (_, q) in enumerate(params) if q is tied)}
    monkeypatch.setattr(zo, "LOOKAHEAD", 4 * tied.shape[1])  # several row blocks even on a tiny vocabulary
    whole = []
    real_perturbed = noise.perturbed
    record = lambda ps, *a: whole.extend(q.shape for q, _ in ps) or real_perturbed(ps, *a)  # noqa: E731
    monkeypatch.setattr(noise, "perturbed", record)
    batch = encode(tokenizer, examples)
    with torch.no_grad(), engine.perturbed(7, 1e-2):
        scores = candidate_scores(model, batch)
    assert tied.shape not in whole
    monkeypatch.setattr(noise, "perturbed", real_perturbed)
    reference = tiny_model(arch, len(tokenizer))
    with torch.no_grad():
        for (name, q), (_, r) in zip(params, select_params(reference), strict=True):
            r.copy_(noise.perturbed([(q, zo.direction_seed(7, name))], 1e-2, "gaussian")[0])
        assert torch.allclose(scores, candidate_scores(reference, batch), rtol=0, atol=1e-5)
        assert not torch.allclose(scores, candidate_scores(model, batch), rtol=0, atol=1e-5)
    assert "forward" not in model.get_input_embeddings().__dict__  # the streamed forwards are removed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_rows_equal_the_rows_of_the_whole_tensor(dtype, monkeypatch):
    """Row ranges that start and end inside noise chunks reproduce the whole-tensor result bitwise."""
    monkeypatch.setattr(noise, "CHUNK", 1000)
    p = torch.randn(97, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    (whole,) = noise.perturbed([(p, 9)], 1e-2, "rademacher")
    for start, stop in [(0, 97), (5, 6), (29, 61), (60, 97)]:
        assert torch.equal(noise.perturbed_rows(p, 9, 1e-2, "rademacher", start, stop), whole[start:stop])


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_direction_statistics_and_reproducibility(dist):
    z = noise.direction(torch.Size([400_000]), 123, dist, torch.device("cpu"))
    assert z.dtype == torch.float32
    assert abs(z.mean().item()) < 5e-3
    assert abs(z.var().item() - 1.0) < 1e-2
    assert torch.equal(z, noise.direction(torch.Size([400_000]), 123, dist, torch.device("cpu")))
    assert not torch.equal(z, noise.direction(torch.Size([400_000]), 124, dist, torch.device("cpu")))
    if dist == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}


def test_update_applies_the_sgd_rule():
    layer = torch.nn.Linear(4, 3)
    engine = ZOEngine(layer, select_params(layer))
    before = [p.detach().clone() for _, p in engine.params]
    engine.update(ZOUpdate(step=0, seed=5, coef=2.0, lr=0.1, weight_decay=0.5))
    for i, (_, p) in enumerate(engine.params):
        expected = before[i] * (1 - 0.1 * 0.5) - 0.1 * 2.0 * engine.direction(i, 5)
        assert torch.allclose(p, expected, atol=1e-7)


def test_directions_do_not_depend_on_peft_wrapping(tokenizer):
    """Canonical names make z identical for the bare model and the same weight inside a PeftModel."""
    bare = tiny_model("llama", len(tokenizer))
    wrapped, groups = prepare(tiny_model("llama", len(tokenizer)), RunConfig(method="hybrid"))
    e_bare, e_wrapped = ZOEngine(bare, select_params(bare)), ZOEngine(wrapped, groups.zo)
    assert len(e_bare.params) == len(e_wrapped.params)
    for i in range(len(e_bare.params)):
        assert torch.equal(e_bare.direction(i, 3), e_wrapped.direction(i, 3))


def test_directions_are_chunked_independently_of_thread_count(monkeypatch):
    """z(seed) is the same with 1 or 2 noise threads, and chunk k can be regenerated on its own."""
    n = int(2.5 * noise.CHUNK)
    for dist in noise.DISTRIBUTIONS:
        monkeypatch.setenv("HYFT_NOISE_THREADS", "1")
        serial = noise.direction(torch.Size([n]), 99, dist, torch.device("cpu"))
        monkeypatch.setenv("HYFT_NOISE_THREADS", "2")
        parallel = noise.direction(torch.Size([n]), 99, dist, torch.device("cpu"))
        assert torch.equal(serial, parallel)
        last = torch.empty(n - 2 * noise.CHUNK)
        assert torch.equal(noise.fill_(last, 99, 2, dist), serial[2 * noise.CHUNK :])
        # neighbouring chunks are not copies of each other
        assert not torch.equal(serial[: noise.CHUNK // 2], serial[noise.CHUNK : noise.CHUNK + noise.CHUNK // 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_streamed_perturbation_and_update_match_the_formula(dtype):
    """perturbed() = p + s·z and axpy_() = shrink·p + a·z, chunk by chunk, with fp32 math below fp32."""
    p = torch.randn(noise.CHUNK + 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    z = noise.direction(p.shape, 5, "gaussian", p.device)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    tol = {"rtol": 0.0, "atol": 1e-6} if dtype in (torch.float32, torch.float64) else {"rtol": 1e-2, "atol": 1e-2}
    (moved,) = noise.perturbed([(p, 5)], 1e-2, "gaussian")
    assert torch.allclose(moved, (p.to(wide) + 1e-2 * z.to(wide)).to(dtype), **tol)
    q = p.clone()
    noise.axpy_([(q, 5)], -0.5, "gaussian", shrink=0.9)
    assert torch.allclose(q, (p.to(wide) * 0.9 - 0.5 * z.to(wide)).to(dtype), **tol)
    assert not torch.equal(q, p)


def test_lookahead_batching_does_not_change_the_perturbed_forward(tokenizer, examples, monkeypatch):
    """Temporaries made one module at a time or many at once give bitwise the same scores."""
    from hyft import zo

    model = tiny_model("llama", len(tokenizer))
    engine = ZOEngine(model, select_params(model))
    batch = encode(tokenizer, examples)
    scores = []
    for lookahead in (1, 1 << 22):
        monkeypatch.setattr(zo, "LOOKAHEAD", lookahead)
        with torch.no_grad(), engine.perturbed(11, 1e-2):
            scores.append(candidate_scores(model, batch))
    assert torch.equal(scores[0], scores[1])
    with torch.no_grad():
        assert not torch.equal(scores[0], candidate_scores(model, batch))
