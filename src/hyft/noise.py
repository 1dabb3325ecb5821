"""Seeded random directions, generated in cache-sized chunks, in parallel on CPU.

A direction z for a tensor of n elements is a sequence of chunks of ``CHUNK`` elements; chunk k is drawn
from its own generator seeded with ``chunk_seed(seed, k)``. So z depends on the seed only (not on the
number of threads), every chunk can be made independently, and each use of z is one pass over memory:
a chunk is generated into a cache-resident buffer and consumed there (θ + εz into a temporary, or the
update into θ) instead of a whole-tensor ``randn`` followed by whole-tensor arithmetic.

Distributions: ``gaussian`` (N(0, 1) per coordinate) and ``rademacher`` (±1 with probability ½ each,
32 signs per 32-bit random word, several times cheaper to draw on CPU). Both have mean 0 and unit
variance per coordinate, which is what SPSA needs for E[z zᵀ] = I.

The values depend on the device's generator (CPU: Mersenne Twister, CUDA: Philox): a ZO log replays
bitwise on the kind of device that wrote it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
from torch import Tensor

DISTRIBUTIONS = ("gaussian", "rademacher")
CHUNK = 1 << 18  # 256 Ki elements = 1 MiB of float32: fits in L2, amortises per-chunk overhead
SCHEME = "chunked-v2"  # the seed → z mapping; recorded in ZO logs so replay refuses a different one
FULL_PRECISION = (torch.float32, torch.float64)  # written in place; lower precisions go through fp32

_SHIFTS: dict[torch.device, Tensor] = {}
_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def check_dist(dist: str) -> None:
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown direction distribution {dist!r}; choose {', '.join(DISTRIBUTIONS)}")


def chunk_seed(seed: int, k: int) -> int:
    """A well-mixed 63-bit seed for chunk ``k`` of the direction with ``seed`` (splitmix64 finaliser)."""
    x = (seed + (k + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


def _generator(device: torch.device) -> torch.Generator:
    """One reusable generator per thread and device (re-seeded per chunk)."""
    gens = getattr(_local, "gens", None)
    if gens is None:
        gens = _local.gens = {}
    if device not in gens:
        gens[device] = torch.Generator(device=device)
    return gens[device]


def _buffer(device: torch.device) -> Tensor:
    """A per-thread float32 scratch chunk, so the hot loop allocates nothing."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    if device not in bufs:
        bufs[device] = torch.empty(CHUNK, dtype=torch.float32, device=device)
    return bufs[device]


def _shifts(device: torch.device) -> Tensor:
    """[31, 30, ..., 0]: shifting a word left by 31 − i puts its bit i in the sign position."""
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(31, -1, -1, dtype=torch.int32, device=device)
    return shifts


def fill_(out: Tensor, seed: int, k: int, dist: str) -> Tensor:
    """Overwrite the contiguous float32 vector ``out`` (≤ CHUNK elements) with chunk k of z(seed)."""
    gen = _generator(out.device)
    gen.manual_seed(chunk_seed(seed, k))
    if dist == "gaussian":
        return out.normal_(generator=gen)
    if dist == "rademacher":
        # bit i of a random 32-bit word becomes the sign bit of the float ±1.0 (0x3F800000 is 1.0f)
        n = out.numel()
        words = torch.randint(-(2**31), 2**31, ((n + 31) // 32, 1), generator=gen, dtype=torch.int32,
                              device=out.device)
        target = out.view(torch.int32) if n % 32 == 0 else torch.empty(words.numel() * 32, dtype=torch.int32,
                                                                      device=out.device)
        signs = torch.bitwise_left_shift(words, _shifts(out.device), out=target.view(-1, 32))
        signs.bitwise_and_(-(2**31)).bitwise_or_(0x3F800000)
        if n % 32:
            out.copy_(target[:n].view(torch.float32))
        return out
    check_dist(dist)
    raise AssertionError


def _workers() -> int:
    return max(1, int(os.environ.get("HYFT_NOISE_THREADS", torch.get_num_threads())))


def _chunks(n: int) -> list[tuple[int, slice]]:
    return [(k, slice(start, min(start + CHUNK, n))) for k, start in enumerate(range(0, n, CHUNK))]


def _run(calls: list[Callable[[], None]], device: torch.device) -> None:
    """Run independent chunk jobs: on a thread pool on CPU (generation and arithmetic release the GIL),
    in order elsewhere. Chunks are independent, so results do not depend on the order or thread count."""
    global _pool, _pool_size
    workers = _workers()
    if device.type != "cpu" or workers == 1 or len(calls) == 1:
        for call in calls:
            call()
        return
    if _pool is None or _pool_size != workers:
        _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="hyft-noise"), workers
    for future in [_pool.submit(call) for call in calls]:
        future.result()


def direction(shape: torch.Size, seed: int, dist: str, device: torch.device) -> Tensor:
    """The whole direction z(seed) as a float32 tensor (tests and small tensors; the engine streams it)."""
    check_dist(dist)
    z = torch.empty(shape, dtype=torch.float32, device=device)
    flat = z.view(-1)
    _run([partial(fill_, flat[s], seed, k, dist) for k, s in _chunks(flat.numel())], device)
    return z


def _perturb_calls(src: Tensor, out: Tensor, seed: int, scale: float, dist: str, start: int = 0,
                   stop: int | None = None) -> list[Callable[[], None]]:
    """Jobs writing ``out = src[start:stop] + scale·z(seed)[start:stop]`` (flat views; float32 arithmetic
    below fp32). Every chunk that overlaps the range is generated whole, so a range reproduces exactly
    the elements of the whole-tensor result."""
    n = src.numel()
    stop = n if stop is None else stop

    def work(k: int, lo: int, hi: int) -> None:
        begin = k * CHUNK
        z = fill_(_buffer(out.device)[: min(CHUNK, n - begin)], seed, k, dist)[lo - begin: hi - begin]
        dst = out[lo - start: hi - start]
        if out.dtype in FULL_PRECISION:
            torch.add(src[lo:hi], z.to(out.dtype), alpha=scale, out=dst)
        else:
            dst.copy_(torch.add(src[lo:hi].float(), z, alpha=scale))

    return [partial(work, k, max(start, k * CHUNK), min(stop, (k + 1) * CHUNK))
            for k in range(start // CHUNK, (stop - 1) // CHUNK + 1)] if stop > start else []


def perturbed(params: list[tuple[Tensor, int]], scale: float, dist: str) -> list[Tensor]:
    """New tensors p + scale·z(seed) in each p's dtype (float32 arithmetic for lower precisions); all
    chunks of all tensors are generated in one parallel batch."""
    outs, calls = [], []
    for p, seed in params:
        src = p.detach().reshape(-1)
        out = torch.empty_like(src)
        outs.append(out.view_as(p))
        calls += _perturb_calls(src, out, seed, scale, dist)
    if calls:
        _run(calls, outs[0].device)
    return outs


def perturbed_rows(p: Tensor, seed: int, scale: float, dist: str, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of p + scale·z(seed) for a 2-d p, bitwise equal to those rows of
    :func:`perturbed`, without making the whole tensor (a tied embedding's lookup and LM head)."""
    cols = p.shape[1]
    out = torch.empty((stop - start, cols), dtype=p.dtype, device=p.device)
    calls = _perturb_calls(p.detach().reshape(-1), out.view(-1), seed, scale, dist, start * cols, stop * cols)
    if calls:
        _run(calls, p.device)
    return out


@torch.no_grad()
def axpy_(params: list[tuple[Tensor, int]], alpha: float, dist: str, shrink: float = 1.0) -> None:
    """In place, for every (p, seed): p ← shrink·p + alpha·z(seed), with float32 arithmetic for
    low-precision p. All chunks of all tensors go to the pool at once, which balances the threads."""

    def work(flat: Tensor, seed: int, k: int, s: slice) -> None:
        z = fill_(_buffer(flat.device)[: s.stop - s.start], seed, k, dist)
        if flat.dtype in FULL_PRECISION:
            chunk = flat[s]
            if shrink != 1.0:
                chunk.mul_(shrink)
            chunk.add_(z.to(flat.dtype), alpha=alpha)
        else:
            new = flat[s].float()
            if shrink != 1.0:
                new.mul_(shrink)
            flat[s].copy_(new.add_(z, alpha=alpha))

    calls = []
    for p, seed in params:
        if not p.is_contiguous():
            raise ValueError("ZO parameters must be contiguous")
        flat = p.view(-1)
        calls += [partial(work, flat, seed, k, s) for k, s in _chunks(flat.numel())]
    if calls:
        _run(calls, params[0][0].device)
