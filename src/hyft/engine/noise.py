"""Seeded random directions from a counter-based generator: z(seed)[i] is a pure function of (seed, i).

Every coordinate is computed from a 64-bit hash of its position (SplitMix64's finaliser over the Weyl
sequence ``key + j·γ``, with ``key`` the direction's full 64-bit seed mixed once), using only integer
tensor ops. So the values do not depend on how a tensor is cut into pieces, on the thread count or on
the device: the random bits are bitwise identical everywhere, and CPU and CUDA differ only in the last
ulp of the float transform (``log``/``cos``/``sin`` of the Gaussian).

Distributions, both with mean 0 and unit variance per coordinate (E[z zᵀ] = I, what SPSA needs):
- ``gaussian``: Box–Muller. z is laid out in blocks of ``BLOCK`` elements; pair j of block b gives
  r·cos θ to element ``b·BLOCK + j`` and r·sin θ to element ``b·BLOCK + BLOCK/2 + j``, so that both
  halves are written as contiguous runs.
- ``rademacher``: ±1, 32 signs per 32-bit word of the hash, written straight into the float bits.

Work is cut into pieces that are whole blocks: ``CPU_PIECE`` elements on CPU, ``DEVICE_PIECE`` elsewhere
(a constant number of kernel launches per tensor up to that size, ~25 per piece). One Python thread
issues the ops and ATen's own threads share each of them (a pool of Python threads issuing small ops
loses to GIL hand-offs). ``log``/``cos``/``sin`` run on slices of 2 ATen grains, which ATen splits, if at
all, into two halves that are multiples of the vector width: no element ever falls into a scalar tail
loop (whose libm result can differ from the vectorised one by an ulp), so CPU results are bitwise
independent of the thread count.
"""

from __future__ import annotations

import ctypes
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from functools import cache

import torch
from torch import Tensor

from hyft.engine import cpu_kernel, device_kernel
from hyft.engine.counter import BLOCK, GAMMA, M1, M2, direction_key, to_i64
from hyft.engine.counter import mix64 as mix64  # re-exported: the tests' reference

DISTRIBUTIONS = ("gaussian", "rademacher")
SCHEME = "counter-v3"  # the (seed, position) → z mapping; recorded in ZO logs so replay refuses another one
CPU_PIECE = 1 << 20  # 1 Mi elements: large enough that ATen's threads share each op, 18 MiB of scratch
DEVICE_PIECE = 1 << 24  # 16 Mi elements on accelerators: one piece for most tensors
FULL_PRECISION = (torch.float32, torch.float64)  # written directly; lower precisions go through fp32

_GAMMA, _M1, _M2 = GAMMA, M1, M2
_HALF = BLOCK // 2
_BLOCK_BITS = BLOCK.bit_length() - 1
_TRANSCENDENTAL = 1 << 16  # log/cos/sin run on slices of 2 ATen grains: split (if at all) in aligned halves
_local = threading.local()


def check_dist(dist: str) -> None:
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown direction distribution {dist!r}; choose {', '.join(DISTRIBUTIONS)}")


_i64 = to_i64


def _mix_(x: Tensor, tmp: Tensor) -> Tensor:
    """In place: SplitMix64's finaliser on int64 tensors (wrapping multiply, logical shifts by masking)."""
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp.bitwise_and_((1 << (64 - shift)) - 1)
        x.bitwise_xor_(tmp)
        if mult is not None:
            x.mul_(_i64(mult))
    return x


class _Scratch:
    """Per-thread, per-device buffers, so the hot loop on CPU allocates nothing."""

    def __init__(self, device: torch.device, pairs: int):
        self.device = device
        self.x = torch.empty(pairs, dtype=torch.int64, device=device)
        self.t = torch.empty(pairs, dtype=torch.int64, device=device)
        self.a = torch.empty(pairs, dtype=torch.float32, device=device)
        self.b = torch.empty(pairs, dtype=torch.float32, device=device)
        self.c = torch.empty(pairs, dtype=torch.float32, device=device)
        self.z = torch.empty(2 * pairs, dtype=torch.float32, device=device)
        self.weyl = torch.arange(pairs, dtype=torch.int64, device=device).mul_(_i64(_GAMMA))  # j·γ (mod 2⁶⁴)
        self.shifts = torch.arange(31, -1, -1, dtype=torch.int32, device=device)


def _transcendental_slice(device: torch.device, n: int) -> int:
    """CPU: slices of 2 ATen grains (aligned splits, no scalar tails); elsewhere one launch for all n."""
    return _TRANSCENDENTAL if device.type == "cpu" else max(n, 1)


def piece_size(device: torch.device) -> int:
    return CPU_PIECE if device.type == "cpu" else DEVICE_PIECE


def _scratch(device: torch.device) -> _Scratch:
    cache = getattr(_local, "scratch", None)
    if cache is None:
        cache = _local.scratch = {}
    if device not in cache:
        cache[device] = _Scratch(device, piece_size(device) // 2)
    return cache[device]


def _hash_(s: _Scratch, key: int, first: int, count: int) -> Tensor:
    """s.x[:count] ← mix64(key + (first + j)·γ) for j < count: the random words of a piece."""
    x = s.x[:count]
    torch.add(s.weyl[:count], _i64(key + first * _GAMMA), out=x)
    return _mix_(x, s.t[:count])


@cache
def kernel() -> ctypes.CDLL | None:
    """The fused CPU kernel, if it reproduces the torch-op path bitwise on a few pieces here (else None, with
    a warning): directions must not depend on which path drew them."""
    lib = cpu_kernel.library()
    if lib is None:
        return None
    for seed, start in ((0, 0), (12345, 1 << 20), (2**63 + 7, 3 * BLOCK)):
        ref = torch.empty(1 << 16, dtype=torch.float32)
        mine = torch.empty_like(ref)
        gaussian_torch_(ref, direction_key(seed), start)
        cpu_kernel.gaussian_(lib, mine, direction_key(seed), start // 2)
        if not torch.equal(ref.view(torch.int32), mine.view(torch.int32)):
            warnings.warn("hyft: the fused CPU kernel differs from torch's ops on this machine; using torch's ops",
                          RuntimeWarning, stacklevel=2)
            return None
    return lib


class _Drawn:
    """How many random numbers the engine has drawn in this process (``hyft bench``'s RNG sweeps per step)."""

    def __init__(self) -> None:
        self.count, self.lock = 0, threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:  # pieces may be drawn from several threads
            self.count += n


DRAWN = _Drawn()


def drawn() -> int:
    """Random numbers drawn so far (pieces filled plus positions gathered)."""
    return DRAWN.count


def fill_(out: Tensor, seed: int, start: int, dist: str) -> Tensor:
    """Overwrite the float32 vector ``out`` with z(seed)[start : start + len(out)].

    ``start`` and ``len(out)`` are multiples of ``BLOCK`` and ``len(out)`` ≤ the device's piece size.
    """
    n = out.numel()
    if start % BLOCK or n % BLOCK or n > piece_size(out.device):
        raise ValueError(f"fill_ needs whole blocks of {BLOCK} (start {start}, length {n})")
    DRAWN.add(n)
    key = direction_key(seed)
    fused = _fill_kernels(out, dist)
    if fused is not None:
        return fused.fill_(out, key, start, dist)
    if dist == "gaussian":
        lib = kernel() if out.device.type == "cpu" else None
        if lib is None or not cpu_kernel.gaussian_(lib, out, key, start // 2):
            gaussian_torch_(out, key, start)
        return out
    if dist == "rademacher":
        # bit i of word w is the sign of element 32·w + i; 0x3F800000 is 1.0f
        s = _scratch(out.device)
        words = _hash_(s, key, start // 32, n // 32)
        signs = out.view(torch.int32).view(-1, 32)
        torch.bitwise_left_shift(words.view(-1, 1).to(torch.int32), s.shifts, out=signs)
        signs.bitwise_and_(-(2**31)).bitwise_or_(0x3F800000)
        return out
    check_dist(dist)
    raise AssertionError


def words_(out: Tensor, seed: int, start: int) -> Tensor:
    """``out`` (int32, a whole-block piece) ← 32 random bits per element of the stream ``seed`` from element
    ``start`` on: the same hash as the directions, for seeded stochastic rounding."""
    n = out.numel()
    if start % BLOCK or n % BLOCK or n > piece_size(out.device):
        raise ValueError(f"words_ needs whole blocks of {BLOCK} (start {start}, length {n})")
    out.view(torch.int64).copy_(_hash_(_scratch(out.device), direction_key(seed), start // 2, n // 2))
    return out


def gaussian_torch_(out: Tensor, key: int, start: int) -> Tensor:
    """The Gaussian path of :func:`fill_` in torch ops (any device; the reference the CPU kernel matches)."""
    n = out.numel()
    s = _scratch(out.device)
    m = n // 2
    x = _hash_(s, key, start // 2, m)
    t, a, b, c = s.t[:m], s.a[:m], s.b[:m], s.c[:m]
    # radius from the high 24 bits: u = (h + 1)·2⁻²⁴ ∈ (0, 1] exactly, so −2 ln u ≥ 0
    torch.bitwise_right_shift(x, 40, out=t)
    t.bitwise_and_((1 << 24) - 1).add_(1)
    a.copy_(t).mul_(2.0**-24)
    # angle from the low 24 bits
    x.bitwise_and_((1 << 24) - 1)
    b.copy_(x).mul_(2 * math.pi * 2.0**-24)
    _box_muller_(a, b, c)
    halves = out.view(-1, 2, _HALF)
    torch.mul(a.view(-1, _HALF), c.view(-1, _HALF), out=halves[:, 0])
    torch.mul(a.view(-1, _HALF), b.view(-1, _HALF), out=halves[:, 1])
    return out


def _box_muller_(a: Tensor, b: Tensor, c: Tensor) -> None:
    """In place: a ← sqrt(−2 ln a) (the radius from u), c ← cos b, b ← sin b (the angle's two sides)."""
    step = _transcendental_slice(a.device, a.numel())
    for lo in range(0, a.numel(), step):  # see the module docstring: no scalar tails on CPU
        hi = min(lo + step, a.numel())
        a[lo:hi].log_()
        torch.cos(b[lo:hi], out=c[lo:hi])
        b[lo:hi].sin_()
    a.mul_(-2.0).sqrt_()


def box_muller_tables(first: int, n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The radius, cos and sin that :func:`gaussian_torch_` computes for the 24-bit inputs first … first + n − 1
    (a hash's high and low words): all 2²⁴ of them are every float a Gaussian z can be made of."""
    a, b, c = (torch.empty(n, dtype=torch.float32, device=device) for _ in range(3))
    a.copy_(torch.arange(first + 1, first + n + 1, device=device)).mul_(2.0**-24)
    b.copy_(torch.arange(first, first + n, device=device)).mul_(2 * math.pi * 2.0**-24)
    _box_muller_(a, b, c)
    return a, c, b


TABLE_CHUNK = 1 << 20  # ~30 MiB of temporaries at a time
_tables_checked: dict[torch.device, str | None] = {}


def check_gaussian_tables(kernels: device_kernel.Kernels, device: torch.device) -> str | None:
    """None if the fused kernels' Box–Muller transform gives torch's bits for all 2²⁴ radii and angles on
    ``device`` (then, the hash being integer arithmetic and z one multiply, every Gaussian z agrees); else what
    differs. Once per device (the transform has no multiply-add to choose), in chunks."""
    if device not in _tables_checked:
        bad: set[str] = set()
        for first in range(0, 1 << 24, TABLE_CHUNK):
            with device_kernel.disabled():
                ref = box_muller_tables(first, TABLE_CHUNK, device)
            mine = kernels.box_muller_tables(first, TABLE_CHUNK, device)
            bad |= {name for name, x, y in zip(("radius", "cos", "sin"), ref, mine, strict=True)
                    if not torch.equal(x.view(torch.int32), y.view(torch.int32))}
        _tables_checked[device] = f"Box-Muller {', '.join(sorted(bad))} differ" if bad else None
    return _tables_checked[device]


def _fill_kernels(out: Tensor, dist: str) -> device_kernel.Kernels | None:
    """The fused kernels for this fill, checked against the torch ops on first use on a device."""
    if out.dtype != torch.float32 or not device_kernel.takes(out):
        return None
    check_dist(dist)
    device = out.device

    def check(kernels: device_kernel.Kernels) -> str | None:
        if dist == "gaussian" and (problem := check_gaussian_tables(kernels, device)):
            return problem
        n = 3 * BLOCK + 77
        for start in (0, 5 * BLOCK + 300):
            paths = (device_kernel.disabled(), device_kernel.forced(kernels))
            ref, mine = (_segment_with(path, n, 2**63 + 12345, start, dist, device) for path in paths)
            if not torch.equal(ref.view(torch.int32), mine.view(torch.int32)):
                return f"z from {start}"
        return None

    return device_kernel.kernels_for(device, ("fill", dist), check)


def _segment_with(path, n: int, seed: int, start: int, dist: str, device: torch.device) -> Tensor:
    with path:
        return segment(n, seed, start, dist, device)


def at(index: Tensor, seed: int, dist: str) -> Tensor:
    """z(seed) at arbitrary element positions ``index`` (int64, any shape), bitwise equal to those elements
    of :func:`fill_` on the same device: a constant number of ops whatever the positions (rows of an
    embedding looked up by a batch)."""
    flat = index.reshape(-1)
    n = flat.numel()
    DRAWN.add(n)
    width = -(-n // 64) * 64  # whole vectors: no element of the float ops falls into a scalar tail
    pos = torch.zeros(width, dtype=torch.int64, device=index.device)
    pos[:n] = flat
    key = direction_key(seed)
    t = torch.empty_like(pos)
    if dist == "rademacher":
        x = torch.bitwise_right_shift(pos, 5).mul_(_i64(_GAMMA)).add_(_i64(key))
        _mix_(x, t)
        bit = pos.bitwise_and(31)
        x = torch.bitwise_right_shift(x, bit, out=t).bitwise_and_(1)  # bit i of the low word; arithmetic shift
        z = x.to(torch.float32).mul_(-2.0).add_(1.0)  # is fine for i < 32 (bits above 31 are never read)
        return z[:n].view(index.shape)
    check_dist(dist)
    block = torch.bitwise_right_shift(pos, _BLOCK_BITS)
    offset = pos.bitwise_and(BLOCK - 1)
    sine = offset >= _HALF
    pair = block.mul_(_HALF).add_(offset.bitwise_and_(_HALF - 1))
    x = _mix_(pair.mul_(_i64(_GAMMA)).add_(_i64(key)), t)
    torch.bitwise_right_shift(x, 40, out=t)
    a = t.bitwise_and_((1 << 24) - 1).add_(1).to(torch.float32).mul_(2.0**-24)
    b = x.bitwise_and_((1 << 24) - 1).to(torch.float32).mul_(2 * math.pi * 2.0**-24)
    c = torch.empty_like(b)
    step = _transcendental_slice(index.device, width)
    for lo in range(0, width, step):
        hi = min(lo + step, width)
        a[lo:hi].log_()
        torch.cos(b[lo:hi], out=c[lo:hi])
        b[lo:hi].sin_()
    a.mul_(-2.0).sqrt_()
    z = a.mul_(torch.where(sine, b, c))
    return z[:n].view(index.shape)


def run(calls: list[Callable[[], None]], device: torch.device) -> None:
    """Run independent piece jobs in order (kept as one place to change how pieces are scheduled)."""
    for call in calls:
        call()


def pieces(lo: int, hi: int, device: torch.device) -> Iterator[tuple[int, int]]:
    """Block-aligned pieces ``[a, b)`` covering the element range ``[lo, hi)``."""
    size = piece_size(device)
    a = lo - lo % BLOCK
    while a < hi:
        b = min(a + size, -(-hi // BLOCK) * BLOCK)
        yield a, b
        a = b


def z_piece(seed: int, a: int, b: int, dist: str, device: torch.device) -> Tensor:
    """z(seed)[a:b] for a piece from :func:`pieces`, in this thread's scratch (valid until the next call)."""
    return fill_(_scratch(device).z[: b - a], seed, a, dist)


def direction(shape: torch.Size, seed: int, dist: str, device: torch.device) -> Tensor:
    """The whole direction z(seed) as a float32 tensor (tests and small tensors; the engine streams it)."""
    check_dist(dist)
    z = torch.empty(shape, dtype=torch.float32, device=device)
    flat = z.view(-1)
    n = flat.numel()

    def work(a: int, b: int) -> None:
        if b <= n:  # whole blocks: generated in place
            fill_(flat[a:b], seed, a, dist)
        else:
            flat[a:n] = z_piece(seed, a, b, dist, device)[: n - a]

    run([lambda a=a, b=b: work(a, b) for a, b in pieces(0, n, device)], device)
    return z


def segment(n: int, seed: int, start: int, dist: str, device: torch.device) -> Tensor:
    """z(seed)[start : start + n] as float32, drawn from the same whole-block pieces as every other use (a
    shard's slice of a direction: bitwise those elements of :func:`direction`)."""
    check_dist(dist)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for a, b in pieces(start, start + n, device):
        i, j = max(a, start), min(b, start + n)
        out[i - start:j - start] = z_piece(seed, a, b, dist, device)[i - a:j - a]
    return out
