"""Properties that need an accelerator. They skip where CUDA is absent (CI has none); on a lent GPU,
``scripts/gpu_run.sh`` runs them: directions drawn on CUDA are the CPU's, and a CUDA run's log rebuilds its base."""

from __future__ import annotations

import pytest
import torch

from hyft.engine import noise
from hyft.engine.zo import canonical_name
from hyft.tools.replay import replay
from hyft.training.loop import Trainer
from tests.test_trainer import tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# stated before any device run: Rademacher signs are written as bits (bitwise); Gaussian goes through log/cos,
# whose last bit may differ between device kinds; low-rank directions add a matrix product U Vᵀ
CROSS_DEVICE = {"rademacher": 0.0, "gaussian": 1e-6, "lowrank": 1e-5}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@cuda
@pytest.mark.parametrize("dist", noise.DISTRIBUTIONS)
def test_directions_drawn_on_cuda_are_the_cpu_directions(dist):
    n = 1_000_003  # not a multiple of any block or word size
    on_cpu = noise.direction(torch.Size([n]), 77, dist, torch.device("cpu"))
    on_cuda = noise.direction(torch.Size([n]), 77, dist, torch.device("cuda")).cpu()
    if CROSS_DEVICE[dist] == 0:
        assert torch.equal(on_cuda, on_cpu)
    else:
        assert _rel(on_cuda, on_cpu) <= CROSS_DEVICE[dist]
    assert not torch.equal(on_cuda, noise.direction(torch.Size([n]), 78, dist, torch.device("cuda")).cpu())


@cuda
@pytest.mark.parametrize(("method", "zo"), [("zo-full", {}), ("hybrid", {}), ("hybrid", dict(zo_dist="gaussian")),
                                            ("hybrid", dict(zo_dist="lowrank", zo_lazy=4))])
def test_a_cuda_run_is_rebuilt_from_its_log_bitwise_on_cuda_and_closely_on_cpu(method, zo, tiny_dir, tmp_path):
    trainer = Trainer(tiny_config(tiny_dir, method=method, device="cuda", **zo), tmp_path / "run", progress=False)
    trainer.run()
    assert next(trainer.model.parameters()).is_cuda
    trained = {canonical_name(n): p.detach().cpu() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    log = tmp_path / "run" / "zo_log.jsonl"
    on_cuda = dict(replay(tiny_dir, log, device="cuda", log=lambda *_: None).named_parameters())
    on_cpu = dict(replay(tiny_dir, log, device="cpu", log=lambda *_: None).named_parameters())
    tolerance = CROSS_DEVICE[zo.get("zo_dist", "rademacher")]
    for name, p in on_cuda.items():
        assert torch.equal(p.detach().cpu(), trained[name]), name
        if tolerance == 0:
            assert torch.equal(on_cpu[name].detach(), trained[name]), name
        else:
            assert _rel(on_cpu[name].detach(), trained[name]) <= tolerance, name


@cuda
def test_token_logprobs_in_row_chunks_are_the_whole_batch_bits_on_cuda(tokenizer, examples, monkeypatch):
    """The CPU test's property where kernels differ: the cross-entropy's row chunks change no bit on CUDA."""
    from hyft.tasks import scoring
    from tests.conftest import tiny_model

    model = tiny_model("llama", len(tokenizer)).cuda()
    batch = scoring.encode(tokenizer, examples).to("cuda")
    results = []
    for rows in (len(batch.input_ids), 4, 1):
        monkeypatch.setattr(scoring, "CE_ROWS", rows)
        model.zero_grad()
        logp, _ = scoring.token_logprobs(model, batch)
        logp.sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    for logp, grads in results[1:]:
        assert torch.equal(logp, results[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1], strict=True))


@cuda
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_fused_kernels_are_kept_and_give_the_torch_ops_bits_on_cuda(dist, dtype):
    """The engine's common variants (perturbed forwards, a bf16 update with its residual, fp32 shifts) pass
    their bitwise checks here, no warning, and a whole step equals the torch ops' step."""
    import warnings
    from contextlib import nullcontext

    from hyft.engine import device_kernel
    from hyft.engine.zo import ZOEngine, ZOUpdate, select_params
    from tests.conftest import tiny_model

    device_kernel.clear()  # earlier tests' checks (and any refusal they warned about) start over
    noise._tables_checked.clear()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for path in (device_kernel.disabled(), nullcontext()):
        model = tiny_model("llama", 300).to(device="cuda", dtype=dtype)
        engine = ZOEngine(model, select_params(model), dist=dist, eps=1e-3)
        before = device_kernel.Launches.count
        with warnings.catch_warnings(), torch.no_grad(), path:
            warnings.simplefilter("error", RuntimeWarning)
            with engine.perturbed(7, 1e-3):
                loss = model(input_ids=ids, labels=ids).loss
            if engine.can_shift:
                engine.shift_(7, 1e-3)
            engine.update(ZOUpdate(step=0, seed=7, coef=0.5, lr=1e-3, shifts=(1e-3,) if engine.can_shift else ()))
        results.append((loss, [p.detach().clone() for _, p in engine.params], device_kernel.Launches.count - before))
    (loss, ps, torch_launches), (loss_k, ps_k, fused_launches) = results
    assert torch_launches == 0 and fused_launches > 0
    checked = {variant: chosen for (where, variant), chosen in device_kernel._verified.items() if where.type == "cuda"}
    assert checked and all(chosen is not None for chosen in checked.values()), checked
    assert torch.equal(loss, loss_k)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps_k, strict=True))
