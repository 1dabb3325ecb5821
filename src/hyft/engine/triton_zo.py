"""The Triton source of :mod:`hyft.engine.device_kernel` (imported only when Triton is installed and a kernel is
first used: ``TRITON_INTERPRET=1`` must be set before that to run them on CPU tensors)."""

import math
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from hyft.engine.counter import BLOCK, GAMMA, M1, M2

# torch's CUDA kernels call the CUDA math library's log/cos/sin and IEEE sqrt: so do these (libdevice). The
# interpreter (CPU tests) patches only triton.language's own math, which it runs in numpy.
_PRECISE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")

# jitted code reads only constexpr globals
_BLOCK = tl.constexpr(BLOCK)
_HALF = tl.constexpr(BLOCK // 2)
_BLOCK_BITS = tl.constexpr(BLOCK.bit_length() - 1)
_GAMMA, _M1, _M2 = tl.constexpr(GAMMA), tl.constexpr(M1), tl.constexpr(M2)
_ANGLE = tl.constexpr(2 * math.pi * 2.0**-24)  # as noise.gaussian_torch_: one fp32 multiply of the low 24 bits



@triton.jit
def key64(lo, hi):
    return (hi.to(tl.uint64) << 32) | lo.to(tl.uint64)


@triton.jit
def mix(x):
    x = x ^ (x >> 30)
    x = x * _M1
    x = x ^ (x >> 27)
    x = x * _M2
    return x ^ (x >> 31)


@triton.jit
def z_at(g, key, GAUSS: tl.constexpr):
    """z at global positions g (int64): the layout of noise.fill_."""
    if GAUSS:
        offset = g & (_BLOCK - 1)
        pair = (g >> _BLOCK_BITS) * _HALF + (offset & (_HALF - 1))
        x = mix(key + pair.to(tl.uint64) * _GAMMA)
        u = (((x >> 40) & 0xFFFFFF) + 1).to(tl.float32) * 5.9604644775390625e-08  # 2⁻²⁴, exact
        angle = (x & 0xFFFFFF).to(tl.float32) * _ANGLE
        if _PRECISE:
            radius = libdevice.sqrt_rn(libdevice.log(u) * -2.0)
            z = radius * tl.where(offset >= _HALF, libdevice.sin(angle), libdevice.cos(angle))
        else:
            radius = tl.sqrt_rn(tl.log(u) * -2.0)
            z = radius * tl.where(offset >= _HALF, tl.sin(angle), tl.cos(angle))
    else:
        x = mix(key + (g >> 5).to(tl.uint64) * _GAMMA)
        bit = (x >> (g & 31).to(tl.uint64)) & 1
        z = 1.0 - 2.0 * bit.to(tl.float32)
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


@triton.jit(do_not_specialize=["start", "key_lo", "key_hi"])
def fill(out, start, n, key_lo, key_hi, GAUSS: tl.constexpr, TILE_: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * TILE_ + tl.arange(0, TILE_)
    mask = k < n
    z = z_at(start.to(tl.int64) + k, key64(key_lo, key_hi), GAUSS)
    tl.store(out + k, z, mask=mask)


@triton.jit(do_not_specialize=["start", "lo", "key_lo", "key_hi"])
def perturb(out, p, r, start, lo, n, key_lo, key_hi, scale, GAUSS: tl.constexpr, LOW: tl.constexpr,
            HAS_R: tl.constexpr, TILE_: tl.constexpr):
    """out[k] = θ[lo + k] (+ r) + scale·z[start + lo + k], rounded once to out's dtype."""
    k = tl.program_id(0).to(tl.int64) * TILE_ + tl.arange(0, TILE_)
    mask = k < n
    e = lo.to(tl.int64) + k
    z = z_at(start.to(tl.int64) + e, key64(key_lo, key_hi), GAUSS)
    x = tl.load(p + e, mask=mask)
    if LOW:
        t = x.to(tl.float32)
        if HAS_R:
            t = t + tl.load(r + e, mask=mask).to(tl.float32)
        t = t + scale * z
    else:
        t = x + scale * z
    tl.store(out + k, rounded(t, out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["start", "key_lo", "key_hi", "sr_lo", "sr_hi"])
def update(p, r, start, n, key_lo, key_hi, sr_lo, sr_hi, neg_step, keep, s0, s1, s2, eps, inv,
           GAUSS: tl.constexpr, LOW: tl.constexpr, HAS_R: tl.constexpr, DECAY: tl.constexpr,
           STEP: tl.constexpr, NSHIFT: tl.constexpr, APPLIED: tl.constexpr, TWO_SIDED: tl.constexpr,
           STOCHASTIC: tl.constexpr, TILE_: tl.constexpr):
    """The update of zmath.update_ for one tensor, operation for operation."""
    k = tl.program_id(0).to(tl.int64) * TILE_ + tl.arange(0, TILE_)
    mask = k < n
    g = start.to(tl.int64) + k
    z = z_at(g, key64(key_lo, key_hi), GAUSS)
    x = tl.load(p + k, mask=mask)
    if not LOW:
        if NSHIFT > 0:
            x = x + s0 * z
        if NSHIFT > 1:
            x = x + s1 * z
        if NSHIFT > 2:
            x = x + s2 * z
        if DECAY:
            x = x * keep
        if STEP:
            x = x + neg_step * z
        tl.store(p + k, x, mask=mask)
    else:
        t = x.to(tl.float32)
        if HAS_R:
            t = t + tl.load(r + k, mask=mask).to(tl.float32)
        v = z
        if APPLIED:
            up = rounded(t + eps * z, x.dtype).to(tl.float32)
            if TWO_SIDED:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
                down = rounded(t + (-eps) * z, x.dtype).to(tl.float32)
            else:
                down = x.to(tl.float32)
            v = (up - down) * inv
        if DECAY:
            t = t * keep
        t = t + neg_step * v
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
