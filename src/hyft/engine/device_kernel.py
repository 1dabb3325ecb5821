"""Fused Triton kernels for the ZO arithmetic on an accelerator: one launch per tensor where the torch ops take
~25-45 (draw z, build θ + r + s·z, update θ and its residual).

Why: on a GPU the engine's sweeps are bound by the host, not the device. A two-sided bf16 step of a 1.17 B
Llama issues ~22 k ATen ops (``hyft bench --launches``), and at the ~9-15 µs each that the first H200 lease's
step times imply, that is the whole of its perturb and update time (BENCHMARKS.md). MeZO's reference issues
2 per tensor. Each kernel here computes z(seed) at its positions in registers (the same counter-based hash and
Box-Muller transform as :mod:`hyft.engine.noise`, see :mod:`hyft.engine.counter`) and does the arithmetic of
:mod:`hyft.engine.zmath` on it in one pass.

Used only where it is bitwise equal to the torch-op path, like the CPU kernel: on first use per device a
self-check runs both paths on a few tensors (Gaussian and Rademacher; fp32, bf16 with and without the residual,
fp16; shifts, decay, the applied direction, stochastic rounding) and keeps the kernels only if every bit agrees,
trying Triton's FMA contraction on, then off. Anything else (no Triton, a failed compile or check,
``HYFT_DEVICE_KERNEL=0``) falls back to the torch ops, which give the same numbers with more launches. A log
therefore replays bitwise whichever path drew it.

On the CPU machine the same kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, numpy's float math):
the tests check their integer hashing and stochastic rounding bitwise, their indexing, and their floats to a
few ulp; ``hyft bench --launches`` counts their launches on meta tensors.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

TILE = 1024  # elements per Triton program
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels read and write; fp64 takes torch ops
MAX_SHIFTS = 3
_state = threading.local()


class Launches:
    """Kernel launches issued (or, counting on meta tensors, that would be issued) in this process."""

    count = 0


def _disabled() -> bool:
    return getattr(_state, "disabled", False)


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block this thread takes the torch-op path (the self-check's reference)."""
    before = _disabled()
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = before


@contextmanager
def counting_on_meta() -> Iterator[None]:
    """Within the block, meta tensors take the fused path and only count its launches (``hyft bench
    --launches``: what an accelerator with the kernels would issue)."""
    before = getattr(_state, "meta", False)
    _state.meta = True
    try:
        yield
    finally:
        _state.meta = before


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@cache
def _kernels() -> Any:
    """The jitted kernels, imported on first use (``TRITON_INTERPRET`` is read when they are defined)."""
    triton_zo = importlib.import_module("hyft.engine.triton_zo")
    return triton_zo.fill, triton_zo.perturb, triton_zo.update


def _split(key: int) -> tuple[int, int]:
    return key & 0xFFFFFFFF, key >> 32


@dataclass(frozen=True)
class Kernels:
    """The fused kernels with one FMA-contraction setting (the one that reproduced the torch ops here)."""

    fp_fusion: bool = True

    def _launch(self, kernel: Any, n: int, *args: Any, **constexprs: Any) -> None:
        Launches.count += 1
        if n == 0 or args[0].is_meta:
            return
        grid = (-(-n // TILE),)
        options = {} if _interpret() else {"enable_fp_fusion": self.fp_fusion}
        kernel[grid](*args, TILE_=TILE, **constexprs, **options)

    def fill_(self, out: Tensor, key: int, start: int, dist: str) -> Tensor:
        """out (float32, contiguous) ← z[start : start + len(out)] of the direction with 64-bit ``key``."""
        fill, _, _ = _kernels()
        self._launch(fill, out.numel(), out, start, out.numel(), *_split(key), GAUSS=dist == "gaussian")
        return out

    def perturb_(self, out: Tensor, p: Tensor, r: Tensor | None, key: int, start: int, lo: int,
                 scale: float, dist: str) -> None:
        """out (flat, θ's dtype) ← elements lo : lo + len(out) of θ + r + scale·z, z from global position
        ``start`` (a shard's first element) on."""
        _, perturb, _ = _kernels()
        low = p.dtype != torch.float32
        self._launch(perturb, out.numel(), out, p, p if r is None else r, start, lo, out.numel(), *_split(key),
                     scale, GAUSS=dist == "gaussian", LOW=low, HAS_R=r is not None)

    def update_(self, p: Tensor, r: Tensor | None, key: int, sr_key: int, start: int, step: float,
                decay: float, dist: str, applied: tuple[float, bool] | None, shifts: tuple[float, ...],
                stochastic: bool) -> None:
        """zmath.update_ on one flat tensor (and its residual), in place."""
        _, _, update = _kernels()
        low = p.dtype != torch.float32
        eps, two_sided = applied if applied is not None else (1.0, True)
        padded = (*shifts, 0.0, 0.0, 0.0)[:MAX_SHIFTS]
        self._launch(update, p.numel(), p, p if r is None else r, start, p.numel(), *_split(key), *_split(sr_key),
                     -step, 1.0 - decay, *padded, eps, 1.0 / (eps * (2.0 if two_sided else 1.0)),
                     GAUSS=dist == "gaussian", LOW=low, HAS_R=r is not None, DECAY=bool(decay),
                     STEP=bool(step), NSHIFT=len(shifts), APPLIED=applied is not None, TWO_SIDED=two_sided,
                     STOCHASTIC=stochastic)


_self_check: Callable[[Kernels, torch.device], str | None] | None = None


def register_self_check(check: Callable[[Kernels, torch.device], str | None]) -> None:
    """Set the check that must find no differing bit before the kernels are used (zmath registers it: this
    module cannot import the torch-op path it is checked against)."""
    global _self_check
    _self_check = check


def takes(t: Tensor) -> bool:
    """Whether the kernels can read and write ``t`` (contiguous, a dtype they handle)."""
    return t.dtype in DTYPES and t.is_contiguous()


def for_device(device: torch.device) -> Kernels | None:
    """The kernels to use on ``device``, or None for the torch ops: an accelerator whose self-check passed,
    or meta tensors while counting launches."""
    if _disabled():
        return None
    if device.type == "meta":
        return Kernels() if getattr(_state, "meta", False) else None
    if device.type == "cpu" and not (_interpret() and os.environ.get("HYFT_DEVICE_KERNEL") == "interpret"):
        return None
    return _checked(device)


@cache
def _checked(device: torch.device) -> Kernels | None:
    if os.environ.get("HYFT_DEVICE_KERNEL", "1") == "0":
        return None
    try:
        _kernels()
    except ImportError:
        log.debug("device kernels off: Triton is not installed")
        return None
    if _self_check is None:  # registered by hyft.engine.zmath, whose torch ops are the reference
        return None
    failures = []
    for fp_fusion in (True, False):
        try:
            problem = _self_check(Kernels(fp_fusion), device)
        except Exception as e:  # a compile or launch failure: the torch ops take over
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            return Kernels(fp_fusion)
        failures.append(problem)
    warnings.warn(f"hyft: the fused device kernels differ from torch's ops on {device} ({failures[0][:160]}); "
                  "using torch's ops, which give the same numbers with more kernel launches", RuntimeWarning,
                  stacklevel=3)
    return None


@contextmanager
def forced(kernels: Kernels) -> Iterator[None]:
    """Within the block, this thread's zmath and noise calls use ``kernels`` on any device (the self-check)."""
    before = getattr(_state, "forced", None)
    _state.forced = kernels
    try:
        yield
    finally:
        _state.forced = before


def current(device: torch.device) -> Kernels | None:
    """What zmath and noise call: a forced set (the self-check), else :func:`for_device`."""
    forced = getattr(_state, "forced", None)
    return forced if forced is not None and not _disabled() else for_device(device)
