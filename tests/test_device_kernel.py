"""The fused device kernels (Triton), run here in Triton's interpreter: the same source as on a GPU, with
numpy's float math (and exact fused multiply-adds). Their hashing, indexing, roundings and update rules must
give the torch-op path's bits; only the Gaussian's log/cos/sin (numpy's, not MKL's or CUDA's) differ by an
ulp, so Gaussian arithmetic is compared with both paths fed the same z. On a GPU each variant is checked
bitwise before use (tests/test_device.py)."""

import importlib
import importlib.util
import itertools
import sys
import warnings

import pytest
import torch

import hyft.engine
from hyft.engine import device_kernel as dk
from hyft.engine import noise, zmath
from hyft.engine.zo import ZOEngine, ZOUpdate, select_params
from hyft.tools.bench.launches import count
from tests.conftest import tiny_model

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
CPU = torch.device("cpu")
N = zmath.CHECK_SIZE
START = zmath.CHECK_STARTS[1]  # a shard that starts inside a block


def forget_triton_zo() -> None:
    """Make the next launch import the kernels' module again (it reads TRITON_INTERPRET when imported)."""
    dk._module.cache_clear()
    dk._importable.cache_clear()
    dk.clear()
    noise._tables_checked.clear()
    sys.modules.pop("hyft.engine.triton_zo", None)
    if hasattr(hyft.engine, "triton_zo"):
        delattr(hyft.engine, "triton_zo")


@pytest.fixture
def kernels(monkeypatch):
    """The kernels in Triton's interpreter, with torch's multiply-add semantics on this CPU."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs Triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    forget_triton_zo()
    yield dk.Kernels(dk.torch_fuses(CPU))
    forget_triton_zo()


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("start", [0, START])
def test_fused_z_is_the_counter_generators_z(kernels, start):
    """Rademacher bitwise; Gaussian to 4 ulp (numpy's log/cos/sin here; on a GPU the check wants 0)."""
    seed = 2**63 + 12345  # every bit of a 64-bit seed matters
    for dist, tolerance in (("rademacher", 0), ("gaussian", 4)):
        with dk.disabled():
            ref = noise.segment(N, seed, start, dist, torch.device("cpu"))
        with dk.forced(kernels):
            mine = noise.segment(N, seed, start, dist, torch.device("cpu"))
        assert ulps(ref, mine) <= tolerance, dist


ONE, TWO = zmath.Applied(1e-3, False), zmath.Applied(1e-3, True)
CASES = [  # dtype, residual, applied direction, in-place shifts, rounding, step, decay: every kernel flag
    *[(torch.float32, False, None, shifts, "nearest", step, decay)
      for shifts, (step, decay) in itertools.product([(), (1e-3,), (1e-3, -2e-3), (1e-3, -2e-3, 1e-3)],
                                                      [(2e-3, 1e-4), (2e-3, 0.0), (0.0, 1e-4)])],
    (torch.bfloat16, True, TWO, (), "nearest", 2e-3, 1e-4),
    (torch.bfloat16, True, ONE, (), "nearest", 2e-3, 0.0),
    (torch.bfloat16, True, None, (), "nearest", 2e-3, 0.0),
    (torch.bfloat16, False, ONE, (), "nearest", 2e-3, 1e-4),
    (torch.bfloat16, False, TWO, (), "stochastic", 2e-3, 1e-4),
    (torch.bfloat16, False, None, (), "stochastic", 2e-3, 0.0),
    (torch.float16, True, TWO, (), "nearest", 2e-3, 1e-4),
    (torch.float16, True, None, (), "nearest", 2e-3, 0.0),
]


def case_id(c) -> str:
    applied = "none" if c[2] is None else ("two" if c[2].two_sided else "one")
    return f"{str(c[0])[6:]}-r{int(c[1])}-{applied}-{c[4]}-shifts{len(c[3])}-step{c[5]}-decay{c[6]}"


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_perturb_and_update_are_the_torch_ops(kernels, monkeypatch, case, dist):
    """θ + r + s·z over an unaligned range of a shard, then the update: the same bits in the perturbed copy, θ
    and the residual. For Gaussian z the torch path is fed the kernels' z (their log/cos differ by an ulp
    here), so what is compared is the arithmetic around it."""
    dtype, residual, applied, shifts, rounding, step, decay = case
    if dist == "gaussian":
        drawn = noise.z_piece
        monkeypatch.setattr(noise, "z_piece", lambda *a: _forced_z(kernels, drawn, *a))
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(N, generator=gen).to(dtype)
    res = (torch.randn(N, generator=gen) * 1e-3).to(dtype) if residual else None
    outs = []
    for path in (dk.disabled(), dk.forced(kernels)):
        t = zmath.Target(theta.clone(), None if res is None else res.clone(), 99, START)
        with path:
            plus = zmath.perturbed_range(t, 1e-3, dist, 17, N)
            zmath.update_([t], step, decay, dist, applied, shifts, rounding)
        outs.append((plus, t.p, t.r))
    assert not torch.equal(outs[0][1], theta) or step == 0.0  # the update moved θ
    for name, a, b in zip(("θ + s·z", "θ", "residual"), *outs, strict=True):
        assert same_bits(a, b), name


def test_fused_engine_step_is_the_torch_engines_step(kernels):
    """Through the engine: a perturbed forward (hooks, streamed embedding and head) and an update give the
    same loss and weights with the kernels as with torch's ops (fp32, Rademacher)."""
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for path in (dk.disabled(), dk.forced(kernels)):
        model = tiny_model("llama", 300)  # tied: the embedding and head are streamed
        engine = ZOEngine(model, select_params(model), dist="rademacher", eps=1e-3)
        with torch.no_grad(), path:
            with engine.perturbed(7, 1e-3):
                loss = model(input_ids=ids, labels=ids).loss
            engine.update(ZOUpdate(step=0, seed=7, coef=0.5, lr=1e-3))
        results.append((loss, [p.detach().clone() for _, p in engine.params]))
    (loss, ps), (loss_k, ps_k) = results
    assert torch.equal(loss, loss_k)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps_k, strict=True))


def test_each_variant_is_checked_once_and_a_kernel_that_differs_is_refused(kernels, monkeypatch):
    """The dispatcher (on CPU only in the interpreter, by request): a variant whose kernel gives the torch
    ops' bits is used after one check; one whose kernel is off by a bit warns once and runs as torch ops,
    with the torch ops' result."""
    monkeypatch.setenv("HYFT_DEVICE_KERNEL", "interpret")
    gen = torch.Generator().manual_seed(1)
    theta, res = torch.randn(N, generator=gen).bfloat16(), (torch.randn(N, generator=gen) * 1e-3).bfloat16()

    def step(decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        t = zmath.Target(theta.clone(), res.clone(), 5, 0)
        zmath.update_([t], 2e-3, decay, "rademacher", TWO)
        return t.p, t.r

    with dk.disabled():
        expected = step(1e-4)
    before = dk.Launches.count
    assert all(same_bits(a, b) for a, b in zip(step(1e-4), expected, strict=True))
    assert dk.Launches.count > before  # checked (both paths), then used
    before = dk.Launches.count
    step(1e-4)
    assert dk.Launches.count == before + 1  # no second check

    right = dk.Kernels.update_

    def off_by_a_bit(self, p, *args, **kwargs):
        right(self, p, *args, **kwargs)
        p.view(torch.int16)[0] ^= 1

    monkeypatch.setattr(dk.Kernels, "update_", off_by_a_bit)
    with dk.disabled():
        expected = step(0.0)
    with pytest.warns(RuntimeWarning, match="differs from torch's ops"):
        got = step(0.0)  # another variant (no decay): checked, refused
    assert all(same_bits(a, b) for a, b in zip(got, expected, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once: the refusal is remembered
        again = step(0.0)
    assert all(same_bits(a, b) for a, b in zip(again, expected, strict=True))
    refused = [variant for (_, variant), chosen in dk._verified.items() if chosen is None]
    assert refused == [("update", "rademacher", torch.bfloat16, True, True, 0, False, True, "nearest")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_add_with_alphas_rounding_as_torch_does(kernels, monkeypatch, dtype):
    """Where θ = −round(s·z), θ + s·z is round(s·z)'s rounding error under a fused multiply-add and 0 under a
    multiply and an add (fp32); in bf16 the two fp32 sums differ by an fp32 ulp of s·z, which moves some of
    their bf16 roundings. The probe's choice (this CPU's torch) gives torch's bits, the other does not."""
    drawn = noise.z_piece
    monkeypatch.setattr(noise, "z_piece", lambda *a: _forced_z(kernels, drawn, *a))
    scale = 1 + 2.0**-12
    with dk.forced(kernels):
        z = noise.segment(N, 99, 0, "gaussian", CPU)
    theta = (-(z * scale)).to(dtype)  # fp32 products, rounded (again, to bf16)
    fused = (theta.double() + scale * z.double()).float().to(dtype)  # exact in float64: one rounding to fp32
    separate = (theta.float() + z * scale).to(dtype)
    assert (fused != separate).sum() >= (N // 3 if dtype == torch.float32 else 5)  # the input tells them apart
    with dk.disabled():
        expected = zmath.perturbed_range(zmath.Target(theta, None, 99, 0), scale, "gaussian", 0, N)
    assert same_bits(expected, fused if dk.torch_fuses(CPU) else separate)
    for fma in (True, False):
        with dk.forced(dk.Kernels(fma)):
            got = zmath.perturbed_range(zmath.Target(theta, None, 99, 0), scale, "gaussian", 0, N)
        assert same_bits(got, expected) == (fma == dk.torch_fuses(CPU))


def _forced_z(kernels, drawn, seed, a, b, dist, device):
    with dk.forced(kernels):
        return drawn(seed, a, b, dist, device)


def test_fused_kernels_launch_once_per_tensor_per_sweep():
    """Counted on meta tensors (no Triton needed): an update sweep is one launch per ZO tensor."""
    model = tiny_model("llama", 300).to("meta")
    params = select_params(model)
    engine = ZOEngine(model, params, dist="gaussian", eps=1e-3)
    update = lambda: engine.update(ZOUpdate(step=0, seed=1, coef=1.0, lr=1e-6))  # noqa: E731
    torch_ops = count(update)
    with dk.counting_on_meta():
        assert count(update) == len(params) < torch_ops


@needs_triton
def test_kernels_compile_for_an_h200_here():
    """The interpreter does not type-check as the compiler does: compile each kernel, with every value of
    every flag at least once, to a cubin for sm_90 (an H200)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no CUDA backend")
    forget_triton_zo()
    tz = importlib.import_module("hyft.engine.triton_zo")
    ints = {"start": "i64", "n": "i64", "key_lo": "u32", "key_hi": "u32"}
    floats = dict.fromkeys(["neg_step", "keep", "s0", "s1", "s2", "eps", "inv"], "fp32")
    cases = [(tz.box_muller_tables, {"radius_out": "*fp32", "cos_out": "*fp32", "sin_out": "*fp32", "first": "i64",
                                     "n": "i64"}, {})]
    cases += [(tz.fill, {"out": "*fp32", **ints}, {"GAUSS": g}) for g in (True, False)]
    for t, gauss, fma in (("bf16", True, True), ("fp16", False, False), ("fp32", True, False)):
        cases.append((tz.perturb, {"out": f"*{t}", "p": f"*{t}", "r": f"*{t}", **ints, "lo": "i64", "scale": "fp32"},
                      {"GAUSS": gauss, "LOW": t != "fp32", "HAS_R": t == "bf16", "FMA": fma}))
    update = {"sr_lo": "u32", "sr_hi": "u32", **floats}
    for t, flags in (
            ("fp32", dict(NSHIFT=3, DECAY=True, STEP=False, APPLIED=False, HAS_R=False, STOCHASTIC=False)),
            ("fp32", dict(NSHIFT=1, DECAY=False, STEP=True, APPLIED=False, HAS_R=False, STOCHASTIC=False)),
            ("bf16", dict(NSHIFT=0, DECAY=True, STEP=True, APPLIED=True, TWO_SIDED=True, HAS_R=True,
                          STOCHASTIC=False)),
            ("bf16", dict(NSHIFT=0, DECAY=False, STEP=True, APPLIED=True, TWO_SIDED=False, HAS_R=False,
                          STOCHASTIC=True)),
            ("fp16", dict(NSHIFT=0, DECAY=True, STEP=True, APPLIED=False, HAS_R=True, STOCHASTIC=False))):
        for gauss in (True, False):
            cases.append((tz.update, {"p": f"*{t}", "r": f"*{t}", **ints, **update},
                          {"TWO_SIDED": True, **flags, "GAUSS": gauss, "LOW": t != "fp32", "FMA": gauss}))
    for fn, signature, flags in cases:
        flags = {**flags, "TILE_": dk.TILE}
        compiled = triton.compile(ASTSource(fn=fn, signature={**signature, **dict.fromkeys(flags, "constexpr")},
                                            constexprs=flags), target=GPUTarget("cuda", 90, 32),
                                  options=dk._options())
        assert compiled.asm["cubin"], (fn.__name__, flags)
    forget_triton_zo()
