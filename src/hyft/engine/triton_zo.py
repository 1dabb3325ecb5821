"""The Triton source of :mod:`hyft.engine.device_kernel` (imported only when Triton is installed and a kernel is
first used: ``TRITON_INTERPRET=1`` must be set before that to run them on CPU tensors).

Float arithmetic is spelled out operation by operation, as torch's ops do it: every ``torch.add(a, b,
alpha=s)`` of the torch path is one ``madd`` (a fused multiply-add where ``FMA``, a multiply, then an add,
otherwise: ``device_kernel.torch_fuses`` says which torch does), every other op is a plain op, and the kernels
are compiled with contraction and flush-to-zero off, so no other multiply-add is fused and subnormals stay.
"""

import math
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from hyft.engine.counter import BLOCK, GAMMA, M1, M2

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # numpy's float math; launch options do not apply
# torch's CUDA kernels call the CUDA math library's log/cos/sin and IEEE sqrt: so do these (libdevice). The
# interpreter patches only triton.language's own math.
_PRECISE = tl.constexpr(not INTERPRETED)

# jitted code reads only constexpr globals
_BLOCK = tl.constexpr(BLOCK)
_HALF = tl.constexpr(BLOCK // 2)
_BLOCK_BITS = tl.constexpr(BLOCK.bit_length() - 1)
_GAMMA, _M1, _M2 = tl.constexpr(GAMMA), tl.constexpr(M1), tl.constexpr(M2)
_ANGLE = tl.constexpr(2 * math.pi * 2.0**-24)  # as noise.gaussian_torch_: one fp32 multiply of the low 24 bits
_U = tl.constexpr(2.0**-24)


@triton.jit
def key64(lo, hi):
    return (hi.to(tl.uint64) << 32) | lo.to(tl.uint64)


@triton.jit
def mix(x):
    """SplitMix64's finaliser (counter.mix64) on uint64."""
    x = x ^ (x >> 30)
    x = x * _M1
    x = x ^ (x >> 27)
    x = x * _M2
    return x ^ (x >> 31)


@triton.jit
def madd(s, z, t, FMA: tl.constexpr):
    """torch.add(t, z, alpha=s)."""
    if FMA:
        return tl.fma(s, z, t)
    else:
        return t + s * z


@triton.jit
def radius(hi24):
    """sqrt(−2 ln u), u = (hi24 + 1)·2⁻²⁴: Box–Muller's radius from the high 24 bits (as noise._box_muller_)."""
    u = (hi24 + 1).to(tl.float32) * _U
    if _PRECISE:
        return libdevice.sqrt_rn(libdevice.log(u) * -2.0)
    else:
        return tl.sqrt_rn(tl.log(u) * -2.0)


@triton.jit
def trig(lo24, sine):
    """cos θ, or sin θ where ``sine``, θ = lo24·2π·2⁻²⁴."""
    angle = lo24.to(tl.float32) * _ANGLE
    if _PRECISE:
        return tl.where(sine, libdevice.sin(angle), libdevice.cos(angle))
    else:
        return tl.where(sine, tl.sin(angle), tl.cos(angle))


@triton.jit
def z_at(g, key, GAUSS: tl.constexpr):
    """z at global positions g (int64): the layout of noise.fill_."""
    if GAUSS:
        offset = g & (_BLOCK - 1)
        pair = (g >> _BLOCK_BITS) * _HALF + (offset & (_HALF - 1))
        x = mix(key + pair.to(tl.uint64) * _GAMMA)
        z = radius((x >> 40) & 0xFFFFFF) * trig(x & 0xFFFFFF, offset >= _HALF)
    else:
        x = mix(key + (g >> 5).to(tl.uint64) * _GAMMA)
        bit = (x >> (g & 31).to(tl.uint64)) & 1
        z = 1.0 - 2.0 * bit.to(tl.float32)  # exact: ±1
    return z


@triton.jit
def rounded(t, dtype: tl.constexpr):
    """t (fp32) rounded to nearest even in ``dtype``; bf16 by integer arithmetic (as c10 does it, and what
    cvt.rn gives), so that Triton's interpreter, whose own bf16 cast does not round to even, agrees too."""
    if dtype == tl.bfloat16:
        word = t.to(tl.int32, bitcast=True)
        word = (word + (((word >> 16) & 1) + 0x7FFF)) & -65536
        return tl.where(t != t, t, word.to(tl.float32, bitcast=True)).to(tl.bfloat16)
    else:
        return t.to(dtype)


@triton.jit
def box_muller_tables(radius_out, cos_out, sin_out, first: tl.int64, n: tl.int64, TILE_: tl.constexpr):
    """The Gaussian's float transform for the 24-bit inputs first … first + n − 1: the radius of each high
    word, cos and sin of each low word (the check compares all 2²⁴ of each with torch's ops)."""
    k = tl.program_id(0).to(tl.int64) * TILE_ + tl.arange(0, TILE_)
    mask = k < n
    tl.store(radius_out + k, radius(first + k), mask=mask)
    tl.store(cos_out + k, trig(first + k, False), mask=mask)
    tl.store(sin_out + k, trig(first + k, True), mask=mask)


@triton.jit
def fill(out, start: tl.int64, n: tl.int64, key_lo: tl.uint32, key_hi: tl.uint32, GAUSS: tl.constexpr,
         TILE_: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * TILE_ + tl.arange(0, TILE_)
    mask = k < n
    tl.store(out + k, z_at(start + k, key64(key_lo, key_hi), GAUSS), mask=mask)


@triton.jit
def perturb(out, p, r, start: tl.int64, lo: tl.int64, n: tl.int64, key_lo: tl.uint32, key_hi: tl.uint32, scale,
            GAUSS: tl.constexpr, LOW: tl.constexpr, HAS_R: tl.constexpr, FMA: tl.constexpr, TILE_: tl.constexpr):
    """out[k] = θ[lo + k] (+ r) + scale·z[start + lo + k], rounded once to out's dtype (zmath._perturb_calls)."""
    k = tl.program_id(0).to(tl.int64) * TILE_ + tl.arange(0, TILE_)
    mask = k < n
    e = lo + k
    z = z_at(start + e, key64(key_lo, key_hi), GAUSS)
    x = tl.load(p + e, mask=mask)
    if LOW:
        t = x.to(tl.float32)
        if HAS_R:
            t = t + tl.load(r + e, mask=mask).to(tl.float32)
        t = madd(scale, z, t, FMA)
    else:
        t = madd(scale, z, x, FMA)
    tl.store(out + k, rounded(t, out.dtype.element_ty), mask=mask)


@triton.jit
def update(p, r, start: tl.int64, n: tl.int64, key_lo: tl.uint32, key_hi: tl.uint32, sr_lo: tl.uint32,
           sr_hi: tl.uint32, neg_step, keep, s0, s1, s2, eps, inv, GAUSS: tl.constexpr, LOW: tl.constexpr,
           HAS_R: tl.constexpr, DECAY: tl.constexpr, STEP: tl.constexpr, NSHIFT: tl.constexpr,
           APPLIED: tl.constexpr, TWO_SIDED: tl.constexpr, STOCHASTIC: tl.constexpr, FMA: tl.constexpr,
           TILE_: tl.constexpr):
    """The update of zmath.update_ for one tensor, operation for operation."""
    k = tl.program_id(0).to(tl.int64) * TILE_ + tl.arange(0, TILE_)
    mask = k < n
    g = start + k
    z = z_at(g, key64(key_lo, key_hi), GAUSS)
    x = tl.load(p + k, mask=mask)
    if not LOW:
        if NSHIFT > 0:
            x = madd(s0, z, x, FMA)
        if NSHIFT > 1:
            x = madd(s1, z, x, FMA)
        if NSHIFT > 2:
            x = madd(s2, z, x, FMA)
        if DECAY:
            x = x * keep
        if STEP:
            x = madd(neg_step, z, x, FMA)
        tl.store(p + k, x, mask=mask)
    else:
        t = x.to(tl.float32)
        if HAS_R:
            t = t + tl.load(r + k, mask=mask).to(tl.float32)
        v = z
        if APPLIED:
            up = rounded(madd(eps, z, t, FMA), x.dtype).to(tl.float32)
            if TWO_SIDED:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
                down = rounded(madd(-eps, z, t, FMA), x.dtype).to(tl.float32)
            else:
                down = x.to(tl.float32)
            v = (up - down) * inv
        if DECAY:
            t = t * keep
        t = madd(neg_step, v, t, FMA)
        if STOCHASTIC:
            h = mix(key64(sr_lo, sr_hi) + (g >> 1).to(tl.uint64) * _GAMMA)
            bits = ((h >> ((g & 1) * 32).to(tl.uint64)) & 0xFFFF).to(tl.int32)
            word = (t.to(tl.int32, bitcast=True) + bits) & -65536
            tl.store(p + k, word.to(tl.float32, bitcast=True).to(x.dtype), mask=mask)
        else:
            new = rounded(t, x.dtype)
            tl.store(p + k, new, mask=mask)
            if HAS_R:
                tl.store(r + k, rounded(t - new.to(tl.float32), x.dtype), mask=mask)
