"""Sparse ZO (Sparse-MeZO, SensZOQ): the same seeded directions, restricted to a fixed set of elements of
each ZO tensor (its mask, a sorted list of flat positions chosen once by :mod:`hyft.engine.masks`).

Only the k masked elements are ever perturbed or updated, so the engine works in place: a perturbation
writes θ + s·z at those positions and the saved k originals are written back afterwards, which is exact
in every dtype. The cost of a perturbation or an update is k elements, not the tensor: at 1 % density a
step's direction work is 1 % of a dense one. z at a position is the dense direction's value there
(:func:`hyft.engine.noise.at`), so a mask of every element gives the dense engine's direction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from hyft.engine import noise, shards
from hyft.engine.zmath import Applied, applied_direction
from hyft.engine.zo import EngineState, ZOUpdate, direction_seed
from hyft.errors import HyftError


class SparseEngine(EngineState):
    """Perturbs and updates ``mask[i]`` (flat int64 positions) of each named parameter from seeds only.

    Same interface as :class:`hyft.engine.zo.ZOEngine`. In bf16/fp16 a k-sized float32 residual per tensor keeps
    what the rounding of each update dropped (``compensate``).
    """

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], mask: list[Tensor],
                 dist: str = "gaussian", compensate: bool = True, applied: Applied | None = None):
        noise.check_dist(dist)
        self.applied = applied  # bf16/fp16: update along the direction the SPSA points applied, as the dense engine
        if len(mask) != len(params):
            raise HyftError(f"the ZO mask has {len(mask)} tensors and the ZO group {len(params)}")
        self.dist, self.params = dist, params
        whole = [m.to(device=p.device, dtype=torch.int64) for m, (_, p) in zip(mask, params, strict=True)]
        for (name, p), m in zip(params, whole, strict=True):
            if m.numel() and (int(m.min()) < 0 or int(m.max()) >= p.numel()):
                raise HyftError(f"the ZO mask of {name} points outside the tensor")
        # FSDP2: this process perturbs the mask's positions inside its rows; z is drawn at the global positions
        self.at: list[Tensor] = []  # global flat positions (the mask's, or this shard's part of it)
        self.mask: list[Tensor] = []  # the same positions in this process's elements of the tensor
        self._before: list[int] = []  # the mask's positions before this shard's (where its residuals start)
        self._whole = whole  # the whole mask (FSDP2: to gather the residuals)
        for (_, p), m in zip(params, whole, strict=True):
            piece, start = shards.local(p.detach())
            if piece.numel() != p.numel() and m.numel() > 1 and not bool((m[1:] > m[:-1]).all()):
                raise HyftError("a sharded weight's ZO mask must be sorted (as hyft.engine.masks writes it)")
            lo, hi = (0, m.numel()) if piece.numel() == p.numel() else torch.searchsorted(
                m, torch.tensor([start, start + piece.numel()], device=m.device)).tolist()
            self.at.append(m[lo:hi])
            self.mask.append(m[lo:hi] - start if start else m[lo:hi])
            self._before.append(lo)
        self.residuals: list[Tensor | None] = [
            torch.zeros(m.numel(), device=p.device) if compensate and p.dtype not in noise.FULL_PRECISION else None
            for m, (_, p) in zip(self.mask, params, strict=True)
        ]
        self._saved: list[Tensor] | None = None  # the masked originals while θ is shifted
        self._pending: tuple[int, tuple[float, ...]] | None = None
        self.can_shift = True  # writing the saved originals back is exact

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    @property
    def masked(self) -> int:
        return sum(m.numel() for m in self.mask)

    def z(self, i: int, step_seed: int) -> Tensor:
        """z(seed) at the masked positions of parameter i (float32, k values)."""
        return noise.at(self.at[i], direction_seed(step_seed, self.params[i][0]), self.dist)

    def direction(self, i: int, step_seed: int) -> Tensor:
        """The masked direction as a dense tensor (zero off the mask; FSDP2: this process's rows), for tests
        and analysis."""
        piece = self._flat(i)
        out = torch.zeros(piece.numel(), dtype=torch.float32, device=piece.device)
        out[self.mask[i]] = self.z(i, step_seed)
        return out.view(shards.local(self.params[i][1].detach())[0].shape)

    def _flat(self, i: int) -> Tensor:
        """Parameter i's elements this process holds, flat (looked up at each use: FSDP2 moves them)."""
        return shards.local(self.params[i][1].detach())[0].view(-1)

    def _full_residual(self, i: int, r: Tensor) -> Tensor:
        """The whole mask's residual (FSDP2: each process's values placed in its rows, gathered)."""
        p = self.params[i][1]
        if not shards.is_sharded(p):
            return r
        piece = shards.local(p.detach())[0]
        rows = torch.zeros(piece.numel(), dtype=r.dtype, device=r.device)
        rows[self.mask[i]] = r
        return shards.full_rows(rows.view(piece.shape), p).reshape(-1)[self._whole[i]]

    def _set_residual(self, i: int, r: Tensor, whole: Tensor) -> None:
        if whole.numel() != self._whole[i].numel():
            raise HyftError(f"the saved residual of {self.params[i][0]} has {whole.numel()} values, not the mask's "
                            f"{self._whole[i].numel()}; this checkpoint cannot be resumed by this version")
        r.copy_(whole.reshape(-1)[self._before[i]:self._before[i] + r.numel()])

    def _true(self, i: int, values: Tensor) -> Tensor:
        """The values in float32 (float64 stays float64), plus the residual where one is kept."""
        r = self.residuals[i]
        wide = values.to(torch.promote_types(values.dtype, torch.float32), copy=True)
        return wide if r is None else wide + r

    @torch.no_grad()
    def _set(self, step_seed: int, scale: float) -> None:
        """θ[mask] ← saved + scale·z (saving the originals first)."""
        if self._saved is None:
            self._saved = [self._flat(i)[m].clone() for i, m in enumerate(self.mask)]
        for i, ((_, p), m) in enumerate(zip(self.params, self.mask, strict=True)):
            value = torch.add(self._true(i, self._saved[i]), self.z(i, step_seed), alpha=scale)  # saved stays
            self._flat(i)[m] = value.to(p.dtype)

    @torch.no_grad()
    def _restore(self) -> None:
        if self._saved is not None:
            for i, (m, saved) in enumerate(zip(self.mask, self._saved, strict=True)):
                self._flat(i)[m] = saved
        self._saved = None

    @contextmanager
    def perturbed(self, step_seed: int, scale: float) -> Iterator[None]:
        """Within the block θ[mask] = θ + scale·z (in place); the originals are written back after."""
        self._set(step_seed, scale)
        try:
            yield
        finally:
            self._restore()

    def shift_(self, step_seed: int, scale: float) -> None:
        """Add scale·z to the current shift (in place): the fused hybrid step's perturbed points."""
        total = scale + (sum(self._pending[1]) if self._pending else 0.0)
        if self._pending and self._pending[0] != step_seed:
            raise HyftError("in-place shifts of two different directions are pending")
        self._set(step_seed, total)
        self._pending = (step_seed, (self._pending[1] if self._pending else ()) + (scale,))

    @torch.no_grad()
    def update(self, u: ZOUpdate) -> None:
        """θ[mask] ← (1 − lr·λ)·θ[mask] − lr·coef·z, after writing back the originals of pending shifts
        (which makes a logged update's ``shifts`` exact no-ops here)."""
        self._restore()
        self._pending = None
        step, decay = u.lr * u.coef, u.lr * u.weight_decay
        if step == 0.0 and decay == 0.0:
            return
        for i, ((_, p), m) in enumerate(zip(self.params, self.mask, strict=True)):
            flat = self._flat(i)
            true = self._true(i, flat[m])
            v = self.z(i, u.seed)
            if self.applied is not None and p.dtype not in noise.FULL_PRECISION:
                # the same arithmetic as the dense engine's (zmath.update_): what the perturbed forwards saw
                v = applied_direction(true, v, p.dtype, self.applied, lambda f=flat, idx=m: f[idx].float())
            if decay:
                true.mul_(1.0 - decay)
            true.add_(v, alpha=-step)
            stored = true.to(p.dtype)
            flat[m] = stored
            r = self.residuals[i]
            if r is not None:
                r.copy_(true - stored.to(true.dtype))
