"""The fused device kernels (Triton), run here in Triton's interpreter: the same source as on a GPU, with
numpy's float math. Their hashing, indexing, roundings and update rule must reproduce the torch-op path;
only the Gaussian's log/cos/sin (numpy's, not the CUDA or MKL library's) may differ, by a few ulp. On a GPU the
self-check demands every bit before the kernels are used (tests/test_device.py)."""

import importlib
import sys

import pytest
import torch

import hyft.engine
from hyft.engine import device_kernel as dk
from hyft.engine import noise, zmath
from hyft.engine.zo import ZOEngine, ZOUpdate, select_params
from hyft.tools.bench.launches import count
from tests.conftest import tiny_model

pytest.importorskip("triton")

N = 3 * noise.BLOCK + 77  # a ragged end
START = 5 * noise.BLOCK + 300  # a shard that starts inside a block


@pytest.fixture
def kernels(monkeypatch):
    """The kernels in Triton's interpreter (TRITON_INTERPRET is read when their module is imported)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    forget_triton_zo()
    yield dk.Kernels()
    forget_triton_zo()


def forget_triton_zo() -> None:
    """Make the next use import the kernels' module again (it reads TRITON_INTERPRET when imported)."""
    dk._kernels.cache_clear()
    sys.modules.pop("hyft.engine.triton_zo", None)
    if hasattr(hyft.engine, "triton_zo"):
        delattr(hyft.engine, "triton_zo")


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


@pytest.mark.parametrize("start", [0, START])
def test_fused_z_is_the_counter_generators_z(kernels, start):
    """Rademacher bitwise; Gaussian to 4 ulp (numpy's log/cos/sin here; on a GPU the self-check wants 0)."""
    seed = 2**63 + 12345  # every bit of a 64-bit seed matters
    for dist, tolerance in (("rademacher", 0), ("gaussian", 4)):
        with dk.disabled():
            ref = noise.segment(N, seed, start, dist, torch.device("cpu"))
        with dk.forced(kernels):
            mine = noise.segment(N, seed, start, dist, torch.device("cpu"))
        assert ulps(ref, mine) <= tolerance, dist


CASES = [  # dtype, residual, applied direction, in-place shifts, rounding
    (torch.float32, False, None, (1e-3, -2e-3), "nearest"),
    (torch.float32, False, None, (), "nearest"),
    (torch.bfloat16, True, zmath.Applied(1e-3, True), (), "nearest"),
    (torch.bfloat16, False, zmath.Applied(1e-3, False), (), "nearest"),
    (torch.bfloat16, False, zmath.Applied(1e-3, True), (), "stochastic"),
    (torch.float16, True, None, (), "nearest"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-r{int(c[1])}-{c[4]}-shifts{len(c[3])}")
@pytest.mark.parametrize("start", [0, START])
def test_fused_perturb_and_update_are_the_torch_ops(kernels, case, start):
    """θ + r + s·z from an unaligned offset, then the update (decay, applied direction, residual, stochastic
    rounding, shifts): with Rademacher z, the same bits in θ (a residual may differ by an fp32 ulp of what it
    holds: numpy does not fuse the multiply-add that torch's CPU kernel fuses)."""
    dtype, residual, applied, shifts, rounding = case
    gen = torch.Generator().manual_seed(start)
    theta = torch.randn(N, generator=gen).to(dtype)
    res = (torch.randn(N, generator=gen) * 1e-3).to(dtype) if residual else None
    outs = []
    for fused in (False, True):
        t = zmath.Target(theta.clone(), None if res is None else res.clone(), 99, start)
        with dk.forced(kernels) if fused else dk.disabled():
            plus = zmath.perturbed_range(t, 1e-3, "rademacher", 17, N)
            zmath.update_([t], 2e-3, 1e-4, "rademacher", applied, shifts, rounding)
        outs.append((plus, t.p, t.r))
    (plus, p, r), (plus_k, p_k, r_k) = outs
    assert torch.equal(plus.view(torch.uint8), plus_k.view(torch.uint8))
    assert torch.equal(p.view(torch.uint8), p_k.view(torch.uint8))
    assert (r is None) == (r_k is None)
    if r is not None:
        gap = (r.float() - r_k.float()).abs()
        # an fp32 ulp of θ + r moves what r holds by that much, or r by one of its own bf16 ulps near a tie
        assert (gap <= 2.4e-7 * p.float().abs() + 2.0**-7 * r.float().abs()).all()
        assert (gap > 0).float().mean() < 0.01


def test_fused_engine_step_is_the_torch_engines_step(kernels):
    """Through the engine: a perturbed forward (hooks, streamed embedding and head) and an update give the
    same loss and weights with the kernels as with torch's ops (fp32, Rademacher)."""
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        model = tiny_model("llama", 300)  # tied: the embedding and head are streamed
        engine = ZOEngine(model, select_params(model), dist="rademacher", eps=1e-3)
        with torch.no_grad(), (dk.forced(kernels) if fused else dk.disabled()):
            with engine.perturbed(7, 1e-3):
                loss = model(input_ids=ids, labels=ids).loss
            engine.update(ZOUpdate(step=0, seed=7, coef=0.5, lr=1e-3))
        results.append((loss, [p.detach().clone() for _, p in engine.params]))
    (loss, ps), (loss_k, ps_k) = results
    assert torch.equal(loss, loss_k)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps_k, strict=True))


def test_a_kernel_that_differs_from_the_torch_ops_is_refused_with_a_warning(kernels, monkeypatch):
    """Here the Gaussian's numpy math differs by an ulp from MKL's: the self-check must refuse the kernels
    (one warning) and the torch ops take over, so no log depends on which path drew it."""
    monkeypatch.setenv("HYFT_DEVICE_KERNEL", "interpret")
    dk._checked.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="differ from torch's ops"):
            assert dk.for_device(torch.device("cpu")) is None
        assert zmath.check_fused_kernels(kernels, torch.device("cpu")).startswith("z (gaussian")
    finally:
        dk._checked.cache_clear()


def test_fused_kernels_launch_once_per_tensor_per_sweep():
    """Counted on meta tensors: an update sweep is one launch per ZO tensor, against many ATen ops."""
    model = tiny_model("llama", 300).to("meta")
    params = select_params(model)
    engine = ZOEngine(model, params, dist="gaussian", eps=1e-3)
    update = lambda: engine.update(ZOUpdate(step=0, seed=1, coef=1.0, lr=1e-6))  # noqa: E731
    torch_ops = count(update)
    with dk.counting_on_meta():
        assert count(update) == len(params) < torch_ops


def test_kernels_compile_for_an_h200_here():
    """The interpreter does not type-check as the compiler does: compile every kernel variant the engine
    launches to a cubin for sm_90 (an H200), with the argument types Triton infers from Python ints (32-bit
    unsigned key halves, 32-bit starts)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no CUDA backend")
    forget_triton_zo()
    tz = importlib.import_module("hyft.engine.triton_zo")

    ints = {"start": "i32", "n": "i32", "key_lo": "u32", "key_hi": "u32"}
    floats = {"neg_step": "fp32", "keep": "fp32", "s0": "fp32", "s1": "fp32", "s2": "fp32", "eps": "fp32",
              "inv": "fp32"}
    cases = [(tz.fill, {"out": "*fp32", **ints}, {"GAUSS": g}) for g in (True, False)]
    for t in ("bf16", "fp16", "fp32"):
        cases.append((tz.perturb, {"out": f"*{t}", "p": f"*{t}", "r": f"*{t}", **ints, "lo": "i64", "scale": "fp32"},
                      {"GAUSS": True, "LOW": t != "fp32", "HAS_R": t != "fp32"}))
        cases.append((tz.update, {"p": f"*{t}", "r": f"*{t}", **ints, "sr_lo": "u32", "sr_hi": "i32", **floats},
                      {"GAUSS": True, "LOW": t != "fp32", "HAS_R": t == "fp16", "DECAY": True, "STEP": True,
                       "NSHIFT": 2 if t == "fp32" else 0, "APPLIED": t != "fp32", "TWO_SIDED": True,
                       "STOCHASTIC": t == "bf16"}))
    for fn, signature, flags in cases:
        flags = {**flags, "TILE_": dk.TILE}
        compiled = triton.compile(ASTSource(fn=fn, signature={**signature, **dict.fromkeys(flags, "constexpr")},
                                            constexprs=flags), target=GPUTarget("cuda", 90, 32),
                                   options={"enable_fp_fusion": True})
        assert compiled.asm["cubin"], (fn.__name__, flags)
