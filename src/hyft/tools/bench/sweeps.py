"""One RNG sweep (z for every ZO weight, made piece by piece as the engine does) timed against two limits:
the previous scheme (a Mersenne Twister / Philox generator seeded per 256 Ki chunk, kept here only as a
reference) and memory bandwidth (one read and one write of the weights, what an update pass costs anyway)."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from hyft.engine import noise
from hyft.tools.bench.timing import device_sync

OLD_CHUNK = 1 << 18


def _counter(numel: int, dist: str, device: torch.device) -> Callable[[], None]:
    def sweep() -> None:
        for a, b in noise.pieces(0, numel, device):
            noise.z_piece(7, a, b, dist, device)
    return sweep


def _torch_ops(numel: int, device: torch.device) -> Callable[[], None]:
    """The Gaussian sweep in torch ops only (what runs where the fused CPU kernel is not available)."""
    out = torch.empty(noise.piece_size(device), device=device)

    def sweep() -> None:
        for a, b in noise.pieces(0, numel, device):
            noise.gaussian_torch_(out[: b - a], noise.direction_key(7), a)
    return sweep


def _previous(numel: int, dist: str, device: torch.device) -> Callable[[], None]:
    """The chunked-v2 scheme: one generator seeded per 256 Ki chunk (normal_, or randint for 32 signs a word),
    chunks spread over a pool of torch's thread count, as that engine ran them."""
    local = threading.local()
    shifts = torch.arange(31, -1, -1, dtype=torch.int32, device=device)

    def chunk(k: int, start: int) -> None:
        if not hasattr(local, "gen"):
            local.gen, local.buf = torch.Generator(device=device), torch.empty(OLD_CHUNK, device=device)
        out = local.buf[: min(OLD_CHUNK, numel - start)]
        local.gen.manual_seed(k * 0x9E3779B9 + 7)
        if dist == "gaussian":
            out.normal_(generator=local.gen)
        else:
            words = torch.randint(-(2**31), 2**31, (out.numel() // 32, 1), generator=local.gen, dtype=torch.int32,
                                  device=device)
            signs = torch.bitwise_left_shift(words, shifts, out=out.view(torch.int32).view(-1, 32))
            signs.bitwise_and_(-(2**31)).bitwise_or_(0x3F800000)

    pool = ThreadPoolExecutor(torch.get_num_threads() if device.type == "cpu" else 1)

    def sweep() -> None:
        for f in [pool.submit(chunk, k, start) for k, start in enumerate(range(0, numel, OLD_CHUNK))]:
            f.result()
    return sweep


def _bandwidth(numel: int, device: torch.device) -> Callable[[], None]:
    weights = torch.zeros(numel, device=device)

    def sweep() -> None:
        weights.add_(1.0)
    return sweep


def time_sweeps(numel: int, device: torch.device, repeats: int = 3, log=print) -> dict[str, float]:
    """Median seconds of one sweep of ``numel`` numbers for each generator, and the bandwidth floor."""
    sync = device_sync(device) or (lambda: None)
    kernel = device.type == "cpu" and noise.kernel() is not None
    cases = {
        "counter gaussian": _counter(numel, "gaussian", device),  # the engine's path: the CPU kernel where active
        **({"counter gaussian, torch ops (without the CPU kernel)": _torch_ops(numel, device)} if kernel else {}),
        "counter rademacher": _counter(numel, "rademacher", device),
        "previous gaussian (per-chunk generator)": _previous(numel, "gaussian", device),
        "previous rademacher (per-chunk generator)": _previous(numel - numel % 32, "rademacher", device),
        "read + write of the weights (bandwidth floor)": _bandwidth(numel, device),
    }
    out = {}
    for name, sweep in cases.items():
        sweep()  # warm-up: scratch buffers, first touch
        out[name] = median_seconds(sweep, sync, repeats)
        log(f"sweep {name}: {out[name]:.3f} s")
    return out


def median_seconds(fn, sync, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, each synchronised (``sync``) at both ends only."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
