"""Arithmetic with directions, streamed piece by piece: θ + s·z into temporaries, and the SPSA update of θ.

Each piece of z is generated (by :mod:`hyft.engine.noise`) into a cache-resident buffer and consumed there, so
a use of z is one pass over the weights. All pieces of all tensors of a call go to the noise pool at once.

Low precision (bf16/fp16) is handled so that what reaches the weights is what the estimate measured:
- θ's true value is ``θ + r``: ``r`` is an optional residual of θ's dtype holding what the last update's
  rounding dropped (Kahan compensation). Updates far below θ's ulp then accumulate instead of vanishing.
- The perturbed weights are ``round(θ + r + s·z)``; the update moves θ along the direction the forwards
  actually saw: ``v = (round(θ + r + εz) − round(θ + r − εz)) / 2ε`` (two-sided) or
  ``(round(θ + r + εz) − θ) / ε`` (one-sided), which equals z where ε·z is resolved and is 0 where the
  perturbation rounded away (e.g. norm weights near 1 at ε = 1e-3 in bf16).
- Or, instead of the residual, ``rounding="stochastic"`` (bf16): the updated fp32 value is rounded up or
  down to bf16 with probabilities that make it exact in expectation, from random bits hashed from the
  direction's seed and the position (:func:`stochastic_round_`); no buffer beyond the weights.
All of it is a deterministic function of (θ, r, seed), so a replay from the same start is bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from hyft.engine import device_kernel, noise


@dataclass(frozen=True)
class Applied:
    """The SPSA points of a low-precision estimate, to rebuild the direction they applied."""

    eps: float
    two_sided: bool


@dataclass
class Target:
    """One ZO tensor as the arithmetic sees it: the stored weight, its residual (or None), its seed, and the
    flat position of its first element in the whole tensor (a shard of a sharded weight starts past 0, so
    it draws exactly its own slice of z)."""

    p: Tensor
    r: Tensor | None
    seed: int
    start: int = 0

    @property
    def low_precision(self) -> bool:
        return self.p.dtype not in noise.FULL_PRECISION


def _true_value(p: Tensor, r: Tensor | None) -> Tensor:
    """θ (+ r) in fp32 for a piece of a low-precision tensor."""
    return p.float() if r is None else p.float().add_(r.float())


def _perturb_calls(t: Target, out: Tensor, scale: float, dist: str, lo: int, hi: int) -> list[Callable[[], None]]:
    """Jobs writing ``out = round(θ[lo:hi] + r[lo:hi] + scale·z[lo:hi])`` (flat views of t.p; z at the global
    positions ``t.start + lo`` on)."""
    src = t.p.detach().reshape(-1)
    res = None if t.r is None else t.r.reshape(-1)
    device, o = src.device, t.start
    fused = _perturb_kernels(t, out, scale, dist)
    if fused is not None:
        noise.DRAWN.add(hi - lo)
        return [partial(fused.perturb_, out, src, res, noise.direction_key(t.seed), o, lo, scale, dist)]

    def work(a: int, b: int) -> None:  # a, b: global positions of a whole-block piece of z
        i, j = max(a, o + lo), min(b, o + hi)
        z = noise.z_piece(t.seed, a, b, dist, device)[i - a: j - a]
        dst = out[i - o - lo: j - o - lo]
        x = src[i - o: j - o]
        if not t.low_precision:
            torch.add(x, z.to(dst.dtype), alpha=scale, out=dst)
        else:
            dst.copy_(_true_value(x, None if res is None else res[i - o: j - o]).add_(z, alpha=scale))

    return [partial(work, a, b) for a, b in noise.pieces(o + lo, o + hi, device)]


def perturbed_into(t: Target, out: Tensor, scale: float, dist: str) -> None:
    """``out`` (θ's shape and dtype; may be θ itself only if ``t.p`` is a copy) ← θ + r + scale·z, bitwise
    equal to :func:`perturbed`."""
    calls = _perturb_calls(t, out.view(-1), scale, dist, 0, t.p.numel())
    if calls:
        noise.run(calls, out.device)


def perturbed(targets: list[Target], scale: float, dist: str) -> list[Tensor]:
    """New tensors θ + r + scale·z(seed) in each θ's dtype; all pieces in one parallel batch."""
    outs, calls = [], []
    for t in targets:
        out = torch.empty(t.p.numel(), dtype=t.p.dtype, device=t.p.device)
        outs.append(out.view_as(t.p))
        calls += _perturb_calls(t, out, scale, dist, 0, t.p.numel())
    if calls:
        noise.run(calls, outs[0].device)
    return outs


def perturbed_range(t: Target, scale: float, dist: str, lo: int, hi: int) -> Tensor:
    """Flat elements ``lo:hi`` of θ + r + scale·z(seed), bitwise equal to that range of :func:`perturbed`,
    without making the whole tensor (rows of an embedding or an LM head)."""
    out = torch.empty(hi - lo, dtype=t.p.dtype, device=t.p.device)
    calls = _perturb_calls(t, out, scale, dist, lo, hi)
    if calls:
        noise.run(calls, t.p.device)
    return out


def perturbed_rows(t: Target, scale: float, dist: str, rows: Tensor) -> Tensor:
    """The given rows (int64 tensor) of a 2-d θ + r + scale·z(seed), made in one batch of ops (an embedding
    lookup): bitwise equal to those rows of :func:`perturbed`."""
    if t.start:
        raise ValueError("perturbed_rows reads whole tensors, not shards")
    cols = t.p.shape[1]
    index = rows.long().view(-1, 1) * cols + torch.arange(cols, device=rows.device)
    z = noise.at(index, t.seed, dist)
    src = t.p.detach()[rows]
    if not t.low_precision:
        return torch.add(src, z.to(src.dtype), alpha=scale)
    true = _true_value(src, None if t.r is None else t.r[rows])
    return true.add_(z, alpha=scale).to(src.dtype)


SR_SALT = 0x5EED_0F_B0_0F  # the rounding bits' stream differs from the direction's


def stochastic_round_(dst: Tensor, x: Tensor, seed: int, start: int) -> None:
    """``dst`` (bf16) ← x (fp32) rounded down or up to bf16, up with probability (x − down)/ulp: add 16
    random bits below bf16's mantissa and truncate. The bits are those of element ``start`` on of the stream
    ``seed ^ SR_SALT`` (any position: a shard's first piece may start inside a block)."""
    n = x.numel()
    skip = start % noise.BLOCK
    bits = noise.words_(torch.empty(-(-(n + skip) // noise.BLOCK) * noise.BLOCK, dtype=torch.int32,
                                    device=x.device), seed ^ SR_SALT, start - skip)[skip:skip + n]
    word = x.view(torch.int32)
    word.add_(bits.bitwise_and_(0xFFFF)).bitwise_and_(-65536)  # two's complement: sign-magnitude rounds |x|
    dst.copy_(x)  # exact: the low 16 bits are zero


def _round(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).float()


def applied_direction(true: Tensor, z: Tensor, dtype: torch.dtype, applied: Applied,
                      unperturbed: Callable[[], Tensor]) -> Tensor:
    """The direction an estimate's perturbed forwards applied in ``dtype`` (fp32 values): (round(true + εz) −
    round(true − εz)) / 2ε, or (round(true + εz) − ``unperturbed()``) / ε one-sided. Every engine's
    low-precision update moves along it."""
    up = _round(torch.add(true, z, alpha=applied.eps), dtype)
    down = _round(torch.add(true, z, alpha=-applied.eps), dtype) if applied.two_sided else unperturbed()
    return up.sub_(down).mul_(1.0 / (applied.eps * (2.0 if applied.two_sided else 1.0)))


@torch.no_grad()
def update_(targets: list[Target], step: float, decay: float, dist: str, applied: Applied | None = None,
            shifts: tuple[float, ...] = (), rounding: str = "nearest") -> None:
    """In place for every target: θ + r ← (1 − decay)·(θ + r) − step·v, with v = z in full precision and
    the applied direction (see the module docstring) in low precision when ``applied`` is given, rounded
    to nearest (with the residual, if kept) or stochastically (``rounding="stochastic"``, bf16).

    ``shifts`` (full precision only): θ ← θ + s·z for each s first, op by op as separate in-place shifts
    would do it, so a step whose perturbations were applied in place replays bitwise in one pass.
    """

    def work(t: Target, flat: Tensor, res: Tensor | None, a: int, b: int) -> None:
        # a, b: global positions of a whole-block piece of z; [i, j) its overlap with this (shard of a) tensor
        o = t.start
        i, j = max(a, o), min(b, o + flat.numel())
        z = noise.z_piece(t.seed, a, b, dist, flat.device)[i - a: j - a]
        piece = flat[i - o: j - o]
        if not t.low_precision:
            for s in shifts:
                piece.add_(z.to(piece.dtype), alpha=s)
            if decay:
                piece.mul_(1.0 - decay)
            if step:
                piece.add_(z.to(piece.dtype), alpha=-step)
            return
        if shifts:
            raise ValueError("in-place shifts are exact only in full precision")
        r = None if res is None else res[i - o: j - o]
        true = _true_value(piece, r)
        v = z
        if applied is not None:
            # exactly the arithmetic of the perturbed forwards (one rounding of θ + r ± εz, then the dtype)
            v = applied_direction(true, z, piece.dtype, applied, piece.float)
        if decay:
            true.mul_(1.0 - decay)
        true.add_(v, alpha=-step)
        if rounding == "stochastic" and piece.dtype == torch.bfloat16:
            stochastic_round_(piece, true, t.seed, i)
            return
        piece.copy_(true)
        if r is not None:
            r.copy_(true.sub_(piece.float()))

    if shifts and any(t.low_precision for t in targets):
        raise ValueError("in-place shifts are exact only in full precision")
    torch_targets = []
    for t in targets:
        fused = _update_kernels(t, step, decay, dist, applied, shifts, rounding)
        if fused is None:
            torch_targets.append(t)
            continue
        noise.DRAWN.add(t.p.numel())
        fused.update_(t.p.view(-1), None if t.r is None else t.r.view(-1), noise.direction_key(t.seed),
                      noise.direction_key(t.seed ^ SR_SALT), t.start, step, decay, dist,
                      None if applied is None else (applied.eps, applied.two_sided), shifts,
                      rounding == "stochastic" and t.p.dtype == torch.bfloat16)
    calls = []
    for t in torch_targets:
        flat = t.p.view(-1)
        res = None if t.r is None else t.r.view(-1)
        calls += [partial(work, t, flat, res, a, b)
                  for a, b in noise.pieces(t.start, t.start + flat.numel(), flat.device)]
    if calls:
        noise.run(calls, torch_targets[0].p.device)


# The fused device kernels (hyft.engine.device_kernel): each variant of a call is checked against the torch ops
# above on its first use on a device, on tensors of CHECK_SIZE elements from two offsets (one inside a block)
# with the call's own scalars.
CHECK_SIZE = 3 * noise.BLOCK + 77  # a ragged end
CHECK_STARTS = (0, 5 * noise.BLOCK + 300)
CHECK_SEED = 2**63 + 12345  # every bit of a 64-bit seed matters


def _sample(dtype: torch.dtype, residual: bool, device: torch.device, seed: int) -> tuple[Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(CHECK_SIZE, generator=gen).to(device=device, dtype=dtype)
    r = (torch.randn(CHECK_SIZE, generator=gen) * 1e-3).to(device=device, dtype=dtype) if residual else None
    return theta, r


def _differ(a: list[Tensor | None], b: list[Tensor | None]) -> bool:
    return any(x is not None and not torch.equal(x.view(torch.uint8), y.view(torch.uint8))
               for x, y in zip(a, b, strict=True))


def _same_both_ways(kernels: device_kernel.Kernels, device: torch.device, dtype: torch.dtype, residual: bool,
                    dist: str, run: Callable[[Target], list[Tensor | None]], what: str) -> str | None:
    """None if ``run`` on sample targets gives the same bits by the torch ops and by ``kernels``; else what
    differed (a Gaussian variant also needs the Box–Muller tables to agree)."""
    if dist == "gaussian" and (problem := noise.check_gaussian_tables(kernels, device)):
        return problem
    for start in CHECK_STARTS:
        theta, r = _sample(dtype, residual, device, start)
        outs = []
        for path in (device_kernel.disabled(), device_kernel.forced(kernels)):
            with path:
                outs.append(run(Target(theta.clone(), None if r is None else r.clone(), CHECK_SEED, start)))
        if _differ(*outs):
            return f"{what} from {start}"
    return None


def _perturb_kernels(t: Target, out: Tensor, scale: float, dist: str) -> device_kernel.Kernels | None:
    if not device_kernel.takes(t.p, t.r, out):
        return None
    device, dtype, residual = t.p.device, t.p.dtype, t.r is not None

    def run(sample: Target) -> list[Tensor | None]:
        return [perturbed_range(sample, scale, dist, 17, CHECK_SIZE)]

    def check(kernels: device_kernel.Kernels) -> str | None:
        return _same_both_ways(kernels, device, dtype, residual, dist, run, "θ + s·z")

    return device_kernel.kernels_for(device, ("perturb", dist, dtype, residual), check)


def _update_kernels(t: Target, step: float, decay: float, dist: str, applied: Applied | None,
                    shifts: tuple[float, ...], rounding: str) -> device_kernel.Kernels | None:
    if not device_kernel.takes(t.p, t.r) or len(shifts) > device_kernel.MAX_SHIFTS:
        return None
    device, dtype, residual = t.p.device, t.p.dtype, t.r is not None
    variant = ("update", dist, dtype, residual, None if applied is None else applied.two_sided, len(shifts),
               bool(decay), bool(step), rounding)

    def run(sample: Target) -> list[Tensor | None]:
        update_([sample], step, decay, dist, applied, shifts, rounding)
        return [sample.p, sample.r]

    def check(kernels: device_kernel.Kernels) -> str | None:
        return _same_both_ways(kernels, device, dtype, residual, dist, run, "update")

    return device_kernel.kernels_for(device, variant, check)
