"""The perturbation engine: SPSA against the true directional derivative, exact restore in every dtype,
tied embeddings streamed and perturbed once, direction statistics, and the update rule."""

from __future__ import annotations

import math

import pytest
import torch

from hyft.config import RunConfig
from hyft.engine import noise, zmath
from hyft.engine.zo import ZOEngine, ZOUpdate, select_params
from hyft.methods import METHODS, Objective
from hyft.methods.params import prepare
from hyft.tasks.scoring import candidate_scores, classification_loss, encode
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
    # the separate hybrid step: the fused one shifts θ in place (tests/test_fused.py)
    config = RunConfig(method=method, lr_zo=0.0, lr_fo=0.0, eps=1e-3, loss="classification", fused=False)
    model, groups = prepare(model, config)
    before = [p.detach().clone() for _, p in groups.zo]
    m = METHODS[method].rule(model, groups, Objective(model, tokenizer, config), config, total=3)
    for step in range(3):
        stats = m.step(examples, step)
        assert stats.zo_coef is not None and stats.zo_coef != 0.0
    for (_, p), b in zip(groups.zo, before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_tied_embedding_is_streamed_and_perturbed_once_consistently(arch, tokenizer, examples, monkeypatch):
    """The tied embedding/LM head is never made whole, and the perturbed forward equals the forward of a
    copy whose every weight (the tied one once) is set to θ + εz."""
    from hyft.engine import zo

    model = tiny_model(arch, len(tokenizer))
    tied = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is tied
    params = select_params(model)
    assert sum(1 for _, q in params if q is tied) == 1  # one tensor, one direction
    engine = ZOEngine(model, params)
    assert set(engine.streamed.values()) == {next(i for i, (_, q) in enumerate(params) if q is tied)}
    monkeypatch.setattr(zo, "LOOKAHEAD", 4 * tied.shape[1])  # several row blocks even on a tiny vocabulary
    whole = []
    real_perturbed = zmath.perturbed
    record = lambda ts, *a: whole.extend(t.p.shape for t in ts) or real_perturbed(ts, *a)  # noqa: E731
    monkeypatch.setattr(zmath, "perturbed", record)
    batch = encode(tokenizer, examples)
    with torch.no_grad(), engine.perturbed(7, 1e-2):
        scores = candidate_scores(model, batch)
    assert tied.shape not in whole
    monkeypatch.setattr(zmath, "perturbed", real_perturbed)
    reference = tiny_model(arch, len(tokenizer))
    with torch.no_grad():
        for (name, q), (_, r) in zip(params, select_params(reference), strict=True):
            r.copy_(zmath.perturbed([zmath.Target(q, None, zo.direction_seed(7, name))], 1e-2, "gaussian")[0])
        assert torch.allclose(scores, candidate_scores(reference, batch), rtol=0, atol=1e-5)
        assert not torch.allclose(scores, candidate_scores(model, batch), rtol=0, atol=1e-5)
    assert "forward" not in model.get_input_embeddings().__dict__  # the streamed forwards are removed


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbed_rows_equal_the_rows_of_the_whole_tensor(dtype, dist, monkeypatch):
    """Row ranges that start and end inside blocks and pieces reproduce the whole-tensor result bitwise."""
    monkeypatch.setattr(noise, "CPU_PIECE", 2 * noise.BLOCK)
    p = torch.randn(297, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    t = zmath.Target(p, None, 9)
    (whole,) = zmath.perturbed([t], 1e-2, dist)
    for start, stop in [(0, 297), (5, 6), (29, 61), (60, 297)]:
        assert torch.equal(zmath.perturbed_range(t, 1e-2, dist, start * 33, stop * 33).view(-1, 33),
                           whole[start:stop])
    rows = torch.tensor([3, 200, 7, 296])
    assert torch.equal(zmath.perturbed_rows(t, 1e-2, dist, rows), whole[rows])


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


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_directions_do_not_depend_on_pieces_or_threads(dist, monkeypatch):
    """z(seed) is a function of position only: the piece size, ATen's thread count and where a range
    starts change no value (bitwise), and distant pieces are not copies of each other."""
    n = 3 * noise.CPU_PIECE + 5000
    reference = noise.direction(torch.Size([n]), 99, dist, torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        for piece, nthreads in [(noise.BLOCK, 1), (1 << 16, 3), (noise.CPU_PIECE, 2)]:
            monkeypatch.setattr(noise, "CPU_PIECE", piece)
            torch.set_num_threads(nthreads)
            assert torch.equal(noise.direction(torch.Size([n]), 99, dist, torch.device("cpu")), reference)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    start = 37 * noise.BLOCK
    part = noise.fill_(torch.empty(8 * noise.BLOCK), 99, start, dist)
    assert torch.equal(part, reference[start: start + 8 * noise.BLOCK])
    assert not torch.equal(reference[:4096], reference[noise.CPU_PIECE: noise.CPU_PIECE + 4096])


def _reference_z(seed: int, i: int, dist: str) -> float:
    """z(seed)[i] from the documented formula, in Python integers and float64."""
    key = noise.direction_key(seed)
    gamma = 0x9E3779B97F4A7C15
    if dist == "rademacher":
        word = noise.mix64(key + (i // 32) * gamma) & 0xFFFFFFFF
        return -1.0 if (word >> (i % 32)) & 1 else 1.0
    block, offset = divmod(i, noise.BLOCK)
    half, j = divmod(offset, noise.BLOCK // 2)
    x = noise.mix64(key + (block * noise.BLOCK // 2 + j) * gamma)
    radius = math.sqrt(-2 * math.log((((x >> 40) & 0xFFFFFF) + 1) * 2.0**-24))
    angle = (x & 0xFFFFFF) * 2 * math.pi * 2.0**-24
    return radius * (math.cos(angle) if half == 0 else math.sin(angle))


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_directions_follow_the_counter_formula_with_full_64_bit_seeds(dist):
    """The tensor code computes the documented hash exactly (Rademacher bitwise, Gaussian to float32
    rounding), and seeds differing only above bit 32 give different directions."""
    seed = (1 << 62) + 12345
    n = 300_000
    z = noise.direction(torch.Size([n]), seed, dist, torch.device("cpu"))
    for i in [0, 1, 511, 512, 513, 1023, 1024, 5000, 131_071, 200_001, n - 1]:
        assert abs(z[i].item() - _reference_z(seed, i, dist)) <= 4e-7 * max(1.0, abs(z[i].item())), i
    high_bits_only = noise.direction(torch.Size([n]), seed + (1 << 40), dist, torch.device("cpu"))
    assert (z == high_bits_only).float().mean() < (0.6 if dist == "rademacher" else 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_streamed_perturbation_and_update_match_the_formula(dtype):
    """perturbed() = p + s·z and update_() = (1 − decay)·p − step·z, piece by piece, fp32 math below fp32."""
    p = torch.randn(noise.CPU_PIECE + 1000, generator=torch.Generator().manual_seed(0)).to(dtype)
    z = noise.direction(p.shape, 5, "gaussian", p.device)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    tol = {"rtol": 0.0, "atol": 1e-6} if dtype in (torch.float32, torch.float64) else {"rtol": 1e-2, "atol": 1e-2}
    (moved,) = zmath.perturbed([zmath.Target(p, None, 5)], 1e-2, "gaussian")
    assert torch.allclose(moved, (p.to(wide) + 1e-2 * z.to(wide)).to(dtype), **tol)
    q = p.clone()
    zmath.update_([zmath.Target(q, None, 5)], 0.5, 0.1, "gaussian")
    assert torch.allclose(q, (p.to(wide) * 0.9 - 0.5 * z.to(wide)).to(dtype), **tol)
    assert not torch.equal(q, p)


def test_lookahead_batching_does_not_change_the_perturbed_forward(tokenizer, examples, monkeypatch):
    """Temporaries made one module at a time or many at once give bitwise the same scores."""
    from hyft.engine import zo

    model = tiny_model("llama", len(tokenizer))
    engine = ZOEngine(model, select_params(model))
    batch = encode(tokenizer, examples)
    scores = []
    monkeypatch.setattr(zo, "_rows_per_block", lambda cols, budget: 64)  # the same LM-head blocks in both
    for lookahead in (1, 1 << 22):
        monkeypatch.setattr(zo, "LOOKAHEAD", lookahead)
        with torch.no_grad(), engine.perturbed(11, 1e-2):
            scores.append(candidate_scores(model, batch))
    assert torch.equal(scores[0], scores[1])
    with torch.no_grad():
        assert not torch.equal(scores[0], candidate_scores(model, batch))


@pytest.mark.parametrize("arch,tied,dropout", [("llama", False, 0.0), ("opt", True, 0.1), ("gpt2", True, 0.0)])
def test_streamed_layers_bound_every_temporary(arch, tied, dropout, tokenizer, examples, monkeypatch):
    """With a small lookahead budget every plain embedding and large linear layer (untied Llama head, OPT
    with biases and dropout) is streamed: no temporary of theirs exceeds the budget (other modules' weights
    are made whole), and the perturbed forward equals the forward of a copy with all weights at θ + εz."""
    from hyft.engine import zo

    model = tiny_model(arch, len(tokenizer), tied=tied, dropout=dropout)
    budget = 2 * model.get_input_embeddings().weight.shape[1] * 8  # a few rows; smaller than any vocab matrix
    monkeypatch.setattr(zo, "LOOKAHEAD", budget)
    params = select_params(model)
    engine = ZOEngine(model, params)
    assert model.get_input_embeddings() in engine.streamed and model.get_output_embeddings() in engine.streamed
    sizes = []
    for name in ("perturbed", "perturbed_range"):  # whole temporaries and row blocks (lookups are batch-sized)
        real = getattr(zmath, name)

        def spy(*args, real=real):
            out = real(*args)
            sizes.extend(o.numel() for o in (out if isinstance(out, list) else [out]))
            return out

        monkeypatch.setattr(zmath, name, spy)
    batch = encode(tokenizer, examples)
    with torch.no_grad(), engine.perturbed(7, 1e-2):
        scores = candidate_scores(model, batch)
    monkeypatch.undo()
    plain = {id(m.weight) for m in model.modules() if type(m) in (torch.nn.Linear, torch.nn.Embedding)}
    others = [p.numel() for _, p in params if id(p) not in plain]  # norms, biases, OPT's position subclass
    assert max(sizes) <= max(budget, *others)
    assert max(sizes) < model.get_input_embeddings().weight.numel()
    reference = tiny_model(arch, len(tokenizer), tied=tied, dropout=dropout)
    with torch.no_grad():
        for (name, q), (_, r) in zip(params, select_params(reference), strict=True):
            r.copy_(zmath.perturbed([zmath.Target(q, None, zo.direction_seed(7, name))], 1e-2, "gaussian")[0])
        assert torch.allclose(scores, candidate_scores(reference, batch), rtol=0, atol=1e-5)


def test_dora_is_refused_for_zo_on_the_base(tokenizer):
    """DoRA reads its base weight outside the base layer's forward: the engine refuses it in one line."""
    from peft import LoraConfig, get_peft_model

    from hyft.errors import HyftError

    model = get_peft_model(tiny_model("llama", len(tokenizer)), LoraConfig(r=4, use_dora=True, task_type="CAUSAL_LM"))
    with pytest.raises(HyftError, match="DoRA"):
        ZOEngine(model, select_params(model, trainable=False))
    plain = get_peft_model(tiny_model("llama", len(tokenizer)), LoraConfig(r=4, task_type="CAUSAL_LM"))
    ZOEngine(plain, select_params(plain, trainable=False))  # plain LoRA is fine


def test_parameters_read_outside_their_module_are_refused(tokenizer, examples):
    """peft's LoRA on an embedding keeps A/B in a ParameterDict whose forward never runs: a ZO group holding
    them would be updated without having been perturbed, so the first perturbed pass refuses it."""
    from hyft.errors import HyftError

    config = RunConfig(method="zo-peft", lora_targets=["embed_tokens", "q_proj"])
    model, groups = prepare(tiny_model("llama", len(tokenizer)), config)
    engine = ZOEngine(model, groups.zo)
    batch = encode(tokenizer, examples)
    with pytest.raises(HyftError, match="lora_embedding"), torch.no_grad(), engine.perturbed(1, 1e-2):
        candidate_scores(model, batch)
