"""Low-rank directions (LOZO, ICLR 2025; SubZero): each weight matrix W (m×n) of the ZO group is perturbed
along z = U Vᵀ/√R, with U (m×R) redrawn every step and V (n×R) held for ``lazy`` steps (one *period*).

Nothing of the size of W is ever drawn or written during a step:
- **Forwards** add the perturbation to the activations: a linear layer computes x Wᵀ + (x V) Mᵀ and an
  embedding W[ids] + M[ids] Vᵀ (a tied head: the same M, V), with M = A + s·U/√R, from a forward hook.
- **Updates** of a period share V, so they add up as (Σ −η c_t U_t/√R) Vᵀ: they accumulate in the float32
  factor A (m×R) and are folded into W, one ``addmm_`` per matrix, when V is redrawn (and by
  :meth:`LowRankEngine.materialize` at the end of a run, export and replay). Between folds the forwards
  include the pending A, so every loss is the loss of the updated weights.
- **Vectors** (norm weights, biases) keep dense Gaussian z, drawn for all of them as one counter-based piece:
  they are small. A matrix read by any other module (GPT-2's ``Conv1D``) is refused.

Every step's factors for the whole model are one draw (one seed, one flat buffer), the update is one ``add_``
of that buffer into A, and a fold is one ``addmm_`` per matrix, so the kernel launches of a step do not grow
with the number of random numbers. z = U Vᵀ/√R has E[z zᵀ] = I over U and V, so the SPSA estimate is
unbiased over periods; within one it estimates the gradient projected on V's columns (LOZO's trade).

Perturbations never touch the stored weights, so the fused step's in-place shifts are virtual here (exact in
every dtype), and in bf16 the direction the forwards saw is U Vᵀ itself (nothing of it is rounded into W).
Everything is a pure function of the log (seeds, coefficients, steps) and of the period root, so a replay
folds at the same steps and gives bitwise the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyft.engine import noise, shards
from hyft.engine.zmath import Applied, applied_direction
from hyft.engine.zo import EngineState, ZOUpdate, direction_seed, lookahead, refuse_outside_readers
from hyft.errors import HyftError

_U, _V, _Z = "#lowrank.U", "#lowrank.V", "#lowrank.vectors"  # the streams of the factors and of the vectors
# the extra state tensors (snapshots, checkpoints): pending updates, V's period, the vectors' float32 values
ACCUMULATOR, PERIOD, VECTORS = "#lowrank.A", "#lowrank.period", "#lowrank.vectors"


def factored(module: nn.Module) -> bool:
    """Modules whose weight the low-rank term can follow: a plain linear layer or embedding lookup."""
    return type(module) is nn.Linear or (type(module) is nn.Embedding and module.max_norm is None)


class LowRankEngine(EngineState):
    """Perturbs and updates ``params`` along low-rank directions of rank ``rank``, V redrawn every ``lazy``
    steps from ``root`` (same interface as :class:`hyft.engine.zo.ZOEngine`, plus :meth:`begin` and
    :meth:`materialize`)."""

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]], rank: int, lazy: int, root: int,
                 eps: float | None = None, two_sided: bool = True, compensate: bool = True):
        if rank < 1 or lazy < 1:
            raise HyftError(f"low-rank directions need zo_rank >= 1 and zo_lazy >= 1, got {rank} and {lazy}")
        refuse_outside_readers(model, params)
        self.params, self.rank, self.lazy, self.root = params, rank, lazy, root
        self.applied = Applied(eps, two_sided) if eps is not None else None
        index = {id(p): i for i, (_, p) in enumerate(params)}
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for attr, p in module.named_parameters(recurse=False):
                if id(p) in index:
                    owners.setdefault(index[id(p)], []).append((module, attr))
        missing = [params[i][0] for i in range(len(params)) if i not in owners]
        if missing:
            raise HyftError(f"ZO parameters not owned by any module of the model: {', '.join(missing[:3])}")
        self.matrices = [i for i, (_, p) in enumerate(params)
                         if p.dim() == 2 and all(a == "weight" and factored(m) for m, a in owners[i])]
        self.vectors = [i for i in range(len(params)) if i not in set(self.matrices)]
        self._k = {i: k for k, i in enumerate(self.matrices)}
        device = params[0][1].device
        too_big = [params[i][0] for i in self.vectors if params[i][1].dim() > 1]
        if too_big:  # dense z for it would be the whole cost low-rank directions avoid
            raise HyftError(f"low-rank directions need the ZO matrices to be nn.Linear or nn.Embedding weights; "
                            f"{too_big[0]} is not one: use zo_dist gaussian or rademacher")
        self.u_off, self.v_off, self.z_off = _offsets([params[i][1].shape[0] * rank for i in self.matrices]), \
            _offsets([params[i][1].shape[1] * rank for i in self.matrices]), \
            _offsets([params[i][1].numel() for i in self.vectors])
        self.A = torch.zeros(self.u_off[-1], dtype=torch.float32, device=device)  # pending updates, fp32
        # matrices keep a residual in bf16/fp16 (folds round once per period); the vectors' true values live in
        # one float32 buffer, so that perturbing or updating all of them is a few ops, not a few per tensor
        # (FSDP2: a residual of this process's rows; A, V and the vectors' float32 values are whole on every one)
        self.residuals: list[Tensor | None] = [
            torch.zeros_like(shards.local(p.detach())[0], memory_format=torch.contiguous_format)
            if compensate and p.dtype not in noise.FULL_PRECISION and i in self._k else None
            for i, (_, p) in enumerate(params)]
        self.compensate = compensate
        self.master = self._stored_vectors()
        self.period = -1  # V's period; -1: none drawn yet
        self.V: Tensor | None = None
        self._dirty = False  # A holds updates not folded yet
        self._draws: dict[tuple[str, int], Tensor] = {}  # this step's U and vector z by seed
        self._step: int | None = None
        self._shift: tuple[int, float] | None = None  # the perturbation in force: (seed, scale)
        self._M: Tensor | None = None  # A + s·U/√R in the compute dtype: what the hooks add (None: nothing)
        self._Vc: Tensor | None = None  # V in the compute dtype
        self._temps: dict[int, Tensor] = {}  # perturbed vectors while a perturbation is in force
        self._outside: dict[tuple[nn.Module, str], Tensor] = {}  # what a swapped-in vector replaced
        self._used: set[int] = set()
        self._checked = False
        self._handles = []
        for i in self.matrices:
            for module, _ in owners[i]:
                self._handles.append(module.register_forward_hook(partial(self._add_term, i)))
        self._vector_owners: dict[nn.Module, list[tuple[str, int]]] = {}
        for i in self.vectors:
            for module, attr in owners[i]:
                self._vector_owners.setdefault(module, []).append((attr, i))
        for module in self._vector_owners:
            self._handles.append(module.register_forward_pre_hook(self._swap_in))
            self._handles.append(module.register_forward_hook(self._swap_out))

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    can_shift = True  # shifts are virtual: nothing is written into the weights until the update

    # --- draws --------------------------------------------------------------------------------------
    def _draw(self, stream: str, seed: int, size: int) -> Tensor:
        key = (stream, seed)
        if key not in self._draws:
            self._draws[key] = noise.direction(torch.Size([size]), direction_seed(seed, stream), "gaussian",
                                               self.A.device)
        return self._draws[key]

    def _factor(self, flat: Tensor, offsets: list[int], k: int, rows: int) -> Tensor:
        """Matrix k's factor as R × rows (U, A and M: R × m; V: R × n), so that x V is ``F.linear(x, v)``
        (a skinny matmul with a contiguous R × n operand is ~3× faster on CPU than with n × R)."""
        return flat[offsets[k]:offsets[k + 1]].view(self.rank, rows)

    def direction(self, i: int, step_seed: int) -> Tensor:
        """Parameter i's direction at this step and period, materialised (tests and analysis)."""
        p = self.params[i][1]
        if i in self.vectors:
            k = self.vectors.index(i)
            z = self._draw(_Z, step_seed, self.z_off[-1])
            return z[self.z_off[k]:self.z_off[k + 1]].view(p.shape).clone()
        k = self._k[i]
        assert self.V is not None, "begin(step) draws V"
        u = self._factor(self._draw(_U, step_seed, self.u_off[-1]), self.u_off, k, p.shape[0])
        v = self._factor(self.V, self.v_off, k, p.shape[1])
        return (u.T @ v) / math.sqrt(self.rank)

    # --- the period ---------------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, step: int) -> None:
        """Enter ``step``: a new period folds the pending updates and draws its V (idempotent per step)."""
        if step == self._step:
            return
        self._step = step
        self._draws.clear()
        period = step // self.lazy
        if period != self.period:
            self._fold()
            self._set_period(period)

    def _set_period(self, period: int) -> None:
        self.period = period
        self.V = None if period < 0 else noise.direction(
            torch.Size([self.v_off[-1]]), direction_seed(self.root + period * 0x9E3779B1, _V), "gaussian",
            self.A.device)
        self._Vc = None if self.V is None else self.V.to(self._dtype)
        self._refresh()

    @property
    def _dtype(self) -> torch.dtype:
        return self.params[0][1].dtype

    @torch.no_grad()
    def _fold(self) -> None:
        """W ← W + A_i V_iᵀ for every matrix (rounded once, with the residual in bf16/fp16); A ← 0. FSDP2:
        each process folds its rows of W with the same rows of A."""
        if not self._dirty or self.V is None:
            return
        for k, i in enumerate(self.matrices):
            whole, r = self.params[i][1].detach(), self.residuals[i]
            p, start = shards.local(whole)
            a = self._factor(self.A, self.u_off, k, whole.shape[0])
            a = a[:, start // whole.shape[1]:start // whole.shape[1] + p.shape[0]]
            v = self._factor(self.V, self.v_off, k, whole.shape[1])
            if p.dtype in noise.FULL_PRECISION:
                p.addmm_(a.T.to(p.dtype), v.to(p.dtype))
                continue
            per = max(1, lookahead(p.device) // p.shape[1])  # bounded fp32 temporaries
            for r0 in range(0, p.shape[0], per):
                rows = slice(r0, min(r0 + per, p.shape[0]))
                true = p[rows].float() if r is None else p[rows].float().add_(r[rows].float())
                true.addmm_(a[:, rows].T, v)
                p[rows] = true.to(p.dtype)
                if r is not None:
                    r[rows] = true.sub_(p[rows].float()).to(r.dtype)
        self.A.zero_()
        self._dirty = False
        self._refresh()

    def materialize(self) -> None:
        """Fold the pending updates into the weights now (end of a run, export, replay): the weights then
        hold the trained model by themselves. A run continued after it would differ from one that was not."""
        self._fold()

    def close(self) -> None:
        """Fold and remove the hooks: the model is a plain model again."""
        self.materialize()
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- perturbation -------------------------------------------------------------------------------
    @torch.no_grad()
    def _refresh(self) -> None:
        """Recompute what the hooks add: M = A + s·U/√R and the perturbed vectors, for the shift in force."""
        seed, scale = self._shift if self._shift else (0, 0.0)
        if scale:
            m = torch.add(self.A, self._draw(_U, seed, self.u_off[-1]), alpha=scale / math.sqrt(self.rank))
        else:
            m = self.A if self._dirty else None
        self._M = None if m is None or self.V is None or not self.matrices else m.to(self._dtype)
        self._temps = {}
        if scale and self.vectors:
            perturbed = torch.add(self.master, self._draw(_Z, seed, self.z_off[-1]), alpha=scale)
            self._temps = dict(zip(self.vectors, self._views(perturbed), strict=True))

    def _views(self, flat: Tensor) -> list[Tensor]:
        """The vectors' pieces of a flat float32 buffer, each in its parameter's dtype and shape."""
        dtypes = {self.params[i][1].dtype for i in self.vectors}
        cast = flat.to(dtypes.pop()) if len(dtypes) == 1 else flat
        return [cast[self.z_off[k]:self.z_off[k + 1]].view(self.params[i][1].shape).to(self.params[i][1].dtype)
                for k, i in enumerate(self.vectors)]

    def _add_term(self, i: int, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        self._used.add(i)
        if self._M is None:
            return None
        k = self._k[i]
        p = self.params[i][1]
        m = self._factor(self._M, self.u_off, k, p.shape[0])
        assert self._Vc is not None
        v = self._factor(self._Vc, self.v_off, k, p.shape[1])
        if isinstance(module, nn.Embedding):  # W[ids] + M[ids] Vᵀ
            left, right = F.embedding(args[0], m.T).reshape(-1, self.rank), v
        else:  # x Wᵀ + (x V) Mᵀ
            x = args[0]
            left, right = F.linear(x.reshape(-1, x.shape[-1]).to(v.dtype), v), m
        rows = out.view(-1, out.shape[-1])
        if torch.is_grad_enabled() and out.requires_grad:  # autograd records the sum (hybrid's FO pass)
            return torch.addmm(rows, left, right).view_as(out)
        # in place: no new activation-sized tensor (a page-faulting allocation on CPU); under autocast the rows
        # are bfloat16 and the factors are not, and addmm_ is not autocast
        rows.addmm_(left.to(rows.dtype), right.to(rows.dtype))
        return None

    def _swap_in(self, module: nn.Module, _args: object) -> None:
        for attr, i in self._vector_owners[module]:
            self._used.add(i)
            if i in self._temps:  # FSDP2: what is replaced is the gathered vector of this forward
                self._outside[(module, attr)] = module._parameters[attr]
                module._parameters[attr] = self._temps[i]

    def _swap_out(self, module: nn.Module, _args: object, _out: object) -> None:
        for attr, _ in self._vector_owners[module]:
            if (module, attr) in self._outside:
                module._parameters[attr] = self._outside.pop((module, attr))

    @contextmanager
    def perturbed(self, step_seed: int, scale: float) -> Iterator[None]:
        """Within the block, forwards see W + A Vᵀ + scale·z(step_seed); the stored weights are untouched."""
        if self.V is None:
            raise HyftError("low-rank directions: begin(step) must run before the first perturbed forward")
        outer = self._shift
        self._shift = (step_seed, scale)
        self._refresh()
        self._used = set()
        try:
            yield
            if not self._checked:
                self._check_reached()
        finally:
            for (module, attr), value in self._outside.items():  # a forward that raised left its vectors in
                module._parameters[attr] = value
            self._outside.clear()
            self._shift = outer
            self._refresh()

    def _check_reached(self) -> None:
        missing = [self.params[i][0] for i in range(len(self.params)) if i not in self._used]
        if missing:
            raise HyftError(f"ZO parameters read outside their module's forward cannot be perturbed: "
                            f"{', '.join(missing[:3])}; leave them out of the ZO group (--zo-params, LoRA targets)")
        self._checked = True

    def shift_(self, step_seed: int, scale: float) -> None:
        """Add ``scale``·z to the perturbation in force until the update (virtual: no weight is written)."""
        if self.V is None:
            raise HyftError("low-rank directions: begin(step) must run before the first perturbed forward")
        if self._shift and self._shift[0] != step_seed:
            raise HyftError("in-place shifts of two different directions are pending")
        total = scale + (self._shift[1] if self._shift else 0.0)
        self._shift = (step_seed, total)
        self._refresh()

    # --- the update ---------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, u: ZOUpdate) -> None:
        """A ← A − η c U/√R (folded when V changes); vectors θ ← θ − η c z; the step's shifts end (they
        were never written). Weight decay would need a dense sweep per step and is refused."""
        if u.weight_decay:
            raise HyftError("weight decay on the ZO weights is not supported with low-rank directions")
        self.begin(u.step)
        self._shift = None
        step = u.lr * u.coef
        if step:
            self.A.add_(self._draw(_U, u.seed, self.u_off[-1]), alpha=-step / math.sqrt(self.rank))
            self._dirty = bool(self.matrices)
            if self.vectors:
                self._update_vectors(u.seed, step)
        self._refresh()

    def _update_vectors(self, seed: int, step: float) -> None:
        """master ← master − step·v for all vectors at once, then each stored vector ← master rounded."""
        v = self._draw(_Z, seed, self.z_off[-1])
        low = [self.params[i][1].dtype for i in self.vectors if self.params[i][1].dtype not in noise.FULL_PRECISION]
        if low and self.applied is not None:  # the direction the perturbed forwards applied
            v = applied_direction(self.master, v, low[0], self.applied, lambda: self.master.to(low[0]).float())
        self.master.add_(v, alpha=-step)
        if low and not self.compensate:  # no residual: the true value is the rounded one
            self.master.copy_(self.master.to(low[0]))
        self._write_vectors()

    def _write_vectors(self) -> None:
        ps = [self.params[i][1].detach() for i in self.vectors]
        if any(shards.is_sharded(p) for p in ps):  # FSDP2: this process's elements of each
            for p, value in zip(ps, self._views(self.master), strict=True):
                shards.copy_from_full_(p, value)
            return
        torch._foreach_copy_(ps, self._views(self.master))

    def _stored_vectors(self) -> Tensor:
        """The vectors as stored, whole, in one float32 buffer (FSDP2: gathered, a collective)."""
        device = self.A.device
        return torch.cat([shards.full(self.params[i][1].detach()).reshape(-1).float() for i in self.vectors]) \
            if self.vectors else torch.zeros(0, device=device)

    # --- state --------------------------------------------------------------------------------------
    def extra_tensors(self) -> dict[str, Tensor]:
        return {ACCUMULATOR: self.A, PERIOD: torch.tensor(self.period, dtype=torch.int64), VECTORS: self.master}

    @torch.no_grad()
    def load_extra_tensors(self, tensors: Callable[[str], Tensor | None]) -> None:
        """After the weights were set: A, the period (V redrawn) and the vectors' float32 values (absent:
        the stored vectors, as at the start of a run)."""
        vectors = tensors(VECTORS)
        if vectors is not None:
            self.master.copy_(vectors)
        elif self.vectors:
            self.master.copy_(self._stored_vectors())
        saved = tensors(ACCUMULATOR)
        self.A.zero_() if saved is None else self.A.copy_(saved)
        self._dirty = bool(self.A.any()) if saved is not None else False
        period = tensors(PERIOD)
        self._step = None
        self._draws.clear()
        self._set_period(-1 if period is None else int(period))


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out
