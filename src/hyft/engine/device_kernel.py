"""Fused Triton kernels for the ZO arithmetic on an accelerator: one launch per tensor where the torch ops take
34-45 (draw z, build θ + r + s·z, update θ and its residual).

Why: a two-sided bf16 step of a 1.17 B Llama launched ~15-17 k kernels through the torch ops, and the first
H200 lease's perturb and update seconds come to ~13 µs per launch, as MeZO's 1.6 k launches do
(``scripts/launch_budget.py``, BENCHMARKS.md): consistent with a step set by its launch count. Each kernel
here computes z(seed) at its positions in registers (the counter hash and Box-Muller layout of
:mod:`hyft.engine.noise`, constants in :mod:`hyft.engine.counter`) and applies :mod:`hyft.engine.zmath`'s rule
to it in the same pass.

Used only where bitwise equal to the torch-op path, like the CPU kernel. Where torch adds with ``alpha`` the
kernels use a fused multiply-add or a multiply and an add, as a probe shows torch does on that device
(:func:`torch_fuses`). Each *variant* (a direction family, dtype, residual or not, applied direction, shifts,
decay, rounding: one compiled kernel each) is checked on its first use on a device by its caller (zmath,
noise), which runs both paths on small tensors with the call's own scalars; a Gaussian variant also needs the
float transform to agree on all 2²⁴ of each of its inputs (``noise.check_gaussian_tables``). A variant that
differs, or cannot be checked, warns once and runs as torch ops.
Anything else (no Triton, a failed compile, ``HYFT_DEVICE_KERNEL=0``) also falls back to the torch ops, which
give the same numbers with more launches. A ZO log therefore replays bitwise whichever path drew it.

On the CPU machine the same kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, numpy's float math
with exact fused multiply-adds), which is how they are tested there; ``hyft bench --launches`` counts their
launches on meta tensors.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, nullcontext
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
_verified: dict[tuple[torch.device, Hashable], Kernels | None] = {}
_lock = threading.RLock()


class Launches:
    """Kernel launches issued (or, counting on meta tensors, that would be issued) in this process."""

    count = 0


@contextmanager
def _setting(name: str, value: Any) -> Iterator[None]:
    """This thread's ``name`` is ``value`` until the block ends; the innermost block wins."""
    before = getattr(_state, name, None)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, before)


def disabled() -> Any:
    """Within the block this thread takes the torch-op path (the checks' reference)."""
    return _setting("mode", "torch")


def forced(kernels: Kernels) -> Any:
    """Within the block this thread's zmath and noise calls use ``kernels`` on any device, unchecked (the
    checks themselves, tests, and ``scripts/gpu_fused.py``)."""
    return _setting("mode", kernels)


def counting_on_meta() -> Any:
    """Within the block, meta tensors take the fused path and only count its launches (``hyft bench
    --launches``: what an accelerator with the kernels would launch)."""
    return _setting("meta", True)


@cache
def _module() -> Any:
    """The kernels' module, imported on first launch (``TRITON_INTERPRET`` is read when it is imported)."""
    return importlib.import_module("hyft.engine.triton_zo")


@dataclass(frozen=True)
class Kernels:
    """The fused kernels; ``fma``: whether an add with ``alpha`` is one fused multiply-add (torch's CUDA and
    vectorised CPU kernels) or a multiply, then an add."""

    fma: bool = True

    def _launch(self, name: str, n: int, *args: Any, **constexprs: Any) -> None:
        if n == 0:
            return
        Launches.count += 1
        if args[0].is_meta:
            return
        module = _module()
        kernel = getattr(module, name)
        options = {} if module.INTERPRETED else _options()
        device = args[0].device
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            kernel[(-(-n // TILE),)](*args, TILE_=TILE, **constexprs, **options)

    def fill_(self, out: Tensor, key: int, start: int, dist: str) -> Tensor:
        """out (float32, contiguous) ← z[start : start + len(out)] of the direction with 64-bit ``key``."""
        self._launch("fill", out.numel(), out, start, out.numel(), *_split(key), GAUSS=dist == "gaussian")
        return out

    def perturb_(self, out: Tensor, p: Tensor, r: Tensor | None, key: int, start: int, lo: int,
                 scale: float, dist: str) -> None:
        """out (flat, θ's dtype) ← elements lo : lo + len(out) of θ + r + scale·z, z from global position
        ``start`` (a shard's first element) on."""
        self._launch("perturb", out.numel(), out, p, p if r is None else r, start, lo, out.numel(), *_split(key),
                     scale, GAUSS=dist == "gaussian", LOW=p.dtype != torch.float32, HAS_R=r is not None,
                     FMA=self.fma)

    def update_(self, p: Tensor, r: Tensor | None, key: int, sr_key: int, start: int, step: float,
                decay: float, dist: str, applied: tuple[float, bool] | None, shifts: tuple[float, ...],
                stochastic: bool) -> None:
        """zmath.update_ on one flat tensor (and its residual), in place."""
        eps, two_sided = applied if applied is not None else (1.0, True)
        padded = (*shifts, 0.0, 0.0, 0.0)[:MAX_SHIFTS]
        self._launch("update", p.numel(), p, p if r is None else r, start, p.numel(), *_split(key),
                     *_split(sr_key), -step, 1.0 - decay, *padded, eps, 1.0 / (eps * (2.0 if two_sided else 1.0)),
                     GAUSS=dist == "gaussian", LOW=p.dtype != torch.float32, HAS_R=r is not None,
                     DECAY=bool(decay), STEP=bool(step), NSHIFT=len(shifts), APPLIED=applied is not None,
                     TWO_SIDED=two_sided, STOCHASTIC=stochastic, FMA=self.fma)

    def box_muller_tables(self, first: int, n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The radius, cos and sin for the 24-bit inputs first … first + n − 1."""
        outs = tuple(torch.empty(n, dtype=torch.float32, device=device) for _ in range(3))
        self._launch("box_muller_tables", n, *outs, first, n)
        return outs


@cache
def _options() -> dict[str, bool]:
    """Compile options: no multiply-add contraction (the kernels spell out every fused multiply-add), and no
    flush-to-zero in libdevice's math (torch's CUDA math keeps subnormals), where this Triton has the option."""
    import dataclasses

    from triton.backends.nvidia.compiler import CUDAOptions

    fields = {f.name for f in dataclasses.fields(CUDAOptions)}
    return {name: False for name in ("enable_fp_fusion", "enable_reflect_ftz") if name in fields}


@cache
def torch_fuses(device: torch.device) -> bool:
    """Whether torch's ``add(t, b, alpha=s)`` on ``device`` is one fused multiply-add (one rounding) or a
    multiply and an add, probed where the two differ: t = −(1 + 2⁻¹¹), b = s = 1 + 2⁻¹²; s·b + t is 2⁻²⁴
    exactly, and rounding s·b first gives 0."""
    t = torch.full((64,), -(1 + 2.0**-11), device=device)
    b = torch.full((64,), 1 + 2.0**-12, device=device)
    got = torch.add(t, b, alpha=1 + 2.0**-12)
    return bool((got == 2.0**-24).all())


def _split(key: int) -> tuple[int, int]:
    return key & 0xFFFFFFFF, key >> 32


def takes(*tensors: Tensor | None) -> bool:
    """Whether the kernels can read and write these tensors together: contiguous, one dtype they handle, one
    device (None: no such tensor)."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    return all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device for t in present) and \
        first.dtype in DTYPES


def kernels_for(device: torch.device, variant: Hashable, check: Callable[[Kernels], str | None]) -> Kernels | None:
    """The kernels for one variant of a call on ``device``, or None for the torch ops.

    ``check(kernels)`` runs the variant both ways on small tensors and says how they differ (None: bitwise
    equal); it runs once per device and variant. Forced kernels (:func:`forced`) and meta counting skip it.
    """
    mode = getattr(_state, "mode", None)
    if mode is not None:
        return None if mode == "torch" else mode
    if device.type == "meta":
        return Kernels() if getattr(_state, "meta", False) else None
    if device.type == "cpu" and not (os.environ.get("TRITON_INTERPRET") == "1"
                                     and os.environ.get("HYFT_DEVICE_KERNEL") == "interpret"):
        return None
    if os.environ.get("HYFT_DEVICE_KERNEL", "1") == "0" or not _importable():
        return None
    key = (device, variant)
    if key not in _verified:
        with _lock:
            if key not in _verified:
                _verified[key] = _verify(device, variant, check)
    return _verified[key]


@cache
def _importable() -> bool:
    try:
        _module()
    except Exception as e:  # no Triton, or one too old or broken: the torch ops take over
        log.debug("device kernels off: %s", e)
        return False
    return True


def _verify(device: torch.device, variant: Hashable, check: Callable[[Kernels], str | None]) -> Kernels | None:
    """The kernels for ``variant`` if ``check`` finds them bitwise equal, with torch's multiply-add semantics
    on this device (probed: samples of realistic scale rarely tell the two apart); else None, warned once.
    (The mode is per thread: the engine issues every piece from the calling thread, ``noise.run``.)"""
    kernels = Kernels(torch_fuses(device))
    try:
        with disabled():  # the check's own calls pick their path by forced() only
            problem = check(kernels)
    except Exception as e:  # a compile, launch or memory failure: not a difference, but not usable either
        warnings.warn(f"hyft: a fused device kernel could not be checked on {device} for {variant} "
                      f"({type(e).__name__}: {str(e)[:160]}); that variant runs as torch's ops", RuntimeWarning,
                      stacklevel=4)
        return None
    if problem is None:
        return kernels
    warnings.warn(f"hyft: a fused device kernel differs from torch's ops on {device} for {variant} ({problem[:160]});"
                  " that variant runs as torch's ops, which give the same numbers with more kernel launches",
                  RuntimeWarning, stacklevel=4)
    return None


def clear() -> None:
    """Forget every check (tests)."""
    with _lock:
        _verified.clear()
