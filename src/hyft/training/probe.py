"""Learning rates from a local quadratic model of the loss, per parameter group (``hyft probe``).

On a few batches, at the starting weights:
- **ZO group θ.** For directions z_i: g_i = (L(θ+εz_i) − L(θ−εz_i))/2ε and the curvature along z_i,
  c_i = (L(θ+εz_i) + L(θ−εz_i) − 2L(θ))/ε². The ZO step θ − η g z lowers the loss in expectation by
  η E[g²] − ½η² E[g² c], so the quadratic model's best η is E[g²]/E[g² c] (≈ 1/tr H_θθ: the
  dimension-dependent ZO rate of MeZO's analysis and the hybrid paper's L_θ constant, measured rather
  than assumed). That model was measured within ε of θ, so the suggestion is capped at the step whose
  length is ε·|z| (η ≤ ε/√E[g²]).
- **FO group φ.** For the optimizer's first-step direction u (SGD: the gradient; AdamW: its sign), the
  step φ − η u is best at η = gᵀu / uᵀH_φφu, with H_φφu from a central difference of two gradients;
  the suggestion is the best of that step and 3, 10, 30, 100 times shorter ones on the probe batches.
- **ε.** Large enough that L(θ+εz) − L(θ−εz) stands well above float rounding of the loss, small enough
  that the curvature term stays below 10 % of the slope term: MeZO's 1e-3 clipped into that window.
Both estimates are ratios of means over every direction and batch (robust to single negative curvatures).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from hyft.methods.base import Method
from hyft.tasks.scoring import Encoded

FLOAT32_RESOLUTION = 2.0**-23


@dataclass
class Probe:
    """What the probe measured and what it suggests (None where a group is absent or shows no curvature)."""

    batches: int
    directions: int
    loss: float
    zo_slope_sq: float | None = None  # E[g²] ≈ |∇θ L|²
    zo_curvature: float | None = None  # E[g² c] / E[g²]: the curvature the ZO step sees (≈ tr H_θθ)
    fo_slope: float | None = None  # E[gᵀu]
    fo_curvature: float | None = None  # E[uᵀHu] / E[|u|²]
    lr_zo_quadratic: float | None = None  # E[g²]/E[g²c]: the quadratic model's best ZO step
    lr_zo_trust: float | None = None  # ε/√E[g²]: a step no longer than the probed radius
    lr_fo_quadratic: float | None = None  # gᵀu/uᵀHu along the optimizer's first step
    fo_line_search: list[list[float]] | None = None  # [lr, mean probe loss at φ − lr·u]
    lr_zo: float | None = None  # suggested: min(quadratic, trust)
    lr_fo: float | None = None  # suggested: the line search's best
    eps: float | None = None
    eps_window: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        def fmt(x: float | None) -> str:
            return "—" if x is None else f"{x:.3g}"
        lines = [f"probe: {self.batches} batches, loss {self.loss:.4f}"]
        if self.zo_curvature is not None:
            lines.append(f"  θ (ZO): E[g²] {fmt(self.zo_slope_sq)}, curvature seen by the ZO step "
                         f"{fmt(self.zo_curvature)} over {self.directions} directions: quadratic step "
                         f"{fmt(self.lr_zo_quadratic)}, trust radius {fmt(self.lr_zo_trust)} → lr_zo {fmt(self.lr_zo)}")
        if self.eps is not None and self.eps_window is not None:
            lines.append(f"  ε window [{fmt(self.eps_window[0])}, {fmt(self.eps_window[1])}] → eps {fmt(self.eps)}")
        if self.fo_curvature is not None:
            lines.append(f"  φ (FO): slope {fmt(self.fo_slope)}, curvature along the first step "
                         f"{fmt(self.fo_curvature)}: quadratic step {fmt(self.lr_fo_quadratic)}, line search "
                         f"{', '.join(f'{fmt(a)}: {b:.4f}' for a, b in self.fo_line_search or [])} → "
                         f"lr_fo {fmt(self.lr_fo)}")
        return "\n".join(lines)


def _flat(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if t is None else t).flatten().float()
                      for t, p in zip(tensors, like, strict=True)])


def fo_direction(grad: Tensor, optimizer: str) -> Tensor:
    """The optimizer's first step direction: AdamW's first update is lr·g/|g| elementwise."""
    return torch.sign(grad) if optimizer == "adamw" else grad


def probe(method: Method, batches: Sequence[Encoded], directions: int = 4, eps: float = 1e-3) -> Probe:
    """Measure both groups of ``method`` at its current weights; the weights are left as they were."""
    model, objective = method.model, method.objective
    losses: list[float] = []
    result = Probe(batches=len(batches), directions=directions * len(batches), loss=float("nan"))
    fo = [p for _, p in method.groups.fo]
    zo_num, zo_den, fo_num, fo_den, fo_norm, slopes = [], [], [], [], [], []
    total_grad: Tensor | None = None
    if method.engine is not None:
        method.engine.begin(0)  # the first step's directions (low-rank: its V), as the run will draw them
    for batch in batches:
        model.eval()
        with torch.no_grad():
            loss0 = objective(batch).item()
        losses.append(loss0)
        if method.engine is not None:
            for _ in range(directions):
                plus, minus = method.loss_pair(batch, method.next_seed(), eps)  # the method's SPSA points
                g, c = (plus - minus) / (2 * eps), (plus + minus - 2 * loss0) / eps**2
                zo_num.append(g * g)
                zo_den.append(g * g * c)
                slopes.append(abs(g))
        if fo:
            grad = _gradient(method, batch, fo)
            total_grad = grad if total_grad is None else total_grad + grad
            u = fo_direction(grad, method.config.optimizer_fo)
            h = 1e-3 * max(1.0, float(_flat([p.detach() for p in fo], fo).abs().max())) / float(u.abs().max())
            hu = (_shifted_gradient(method, batch, fo, u, h) - _shifted_gradient(method, batch, fo, u, -h)) / (2 * h)
            fo_num.append(float(grad @ u))
            fo_den.append(float(u @ hu))
            fo_norm.append(float(u @ u))
    result.loss = statistics.fmean(losses)
    if zo_num:
        result.zo_slope_sq = statistics.fmean(zo_num)
        curvature = statistics.fmean(zo_den) / result.zo_slope_sq if result.zo_slope_sq > 0 else 0.0
        result.zo_curvature = curvature
        result.lr_zo_quadratic = 1.0 / curvature if curvature > 0 else None
        # the quadratic model holds where it was measured: a step η·g·z no longer than ε·z
        result.lr_zo_trust = eps / math.sqrt(result.zo_slope_sq) if result.zo_slope_sq > 0 else None
        steps = [x for x in (result.lr_zo_quadratic, result.lr_zo_trust) if x is not None]
        result.lr_zo = min(steps) if result.lr_zo_quadratic is not None else None
        low = 100 * FLOAT32_RESOLUTION * abs(result.loss) / max(statistics.fmean(slopes), 1e-30)
        high = 0.1 * statistics.fmean(slopes) / curvature if curvature > 0 else math.inf
        result.eps_window = (low, high)
        result.eps = min(max(eps, low), high) if low <= high else low
    if fo_num:
        result.fo_slope = statistics.fmean(fo_num)
        den = statistics.fmean(fo_den)
        result.fo_curvature = den / statistics.fmean(fo_norm)
        result.lr_fo_quadratic = result.fo_slope / den if den > 0 else None
        if result.lr_fo_quadratic is not None and total_grad is not None:
            u = fo_direction(total_grad, method.config.optimizer_fo)
            trials = [result.lr_fo_quadratic / f for f in LINE_SEARCH]
            result.fo_line_search = [[lr, _loss_after(method, batches, fo, u, lr)] for lr in trials]
            result.lr_fo = min(result.fo_line_search, key=lambda t: t[1])[0]
    return result


LINE_SEARCH = (1, 3, 10, 30, 100)  # the quadratic step and shorter ones: the model's step is only a guess


def _loss_after(method: Method, batches: Sequence[Encoded], params: list[Tensor], u: Tensor, lr: float) -> float:
    """Mean loss over ``batches`` at φ − lr·u (φ restored after)."""
    with _shifted(params, u, -lr), torch.no_grad():
        method.model.eval()
        return statistics.fmean(method.objective(b).item() for b in batches)


@contextmanager
def _shifted(params: list[Tensor], u: Tensor, scale: float) -> Iterator[None]:
    """Within the block φ = φ + scale·u (``u`` flat over ``params``); φ is restored exactly after."""
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        offset = 0
        for p in params:
            p.add_(u[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=scale)
            offset += p.numel()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def _gradient(method: Method, batch: Encoded, params: list[Tensor]) -> Tensor:
    method.model.eval()  # the probe measures the deterministic loss
    loss = method.objective(batch)
    return _flat(torch.autograd.grad(loss, params, allow_unused=True), params)


def _shifted_gradient(method: Method, batch: Encoded, params: list[Tensor], u: Tensor, h: float) -> Tensor:
    """∇φ L at φ + h·u (φ restored after)."""
    with _shifted(params, u, h):
        return _gradient(method, batch, params)


def batches_of(examples: Sequence, batch_size: int, count: int, encode: Callable[[Sequence], Encoded]) -> list[Encoded]:
    """The first ``count`` batches of ``examples`` (the run's sampled training split, in its order)."""
    return [encode([examples[(b * batch_size + j) % len(examples)] for j in range(batch_size)]) for b in range(count)]


PROBE_BATCHES = 4


def probe_run(config, model, groups, objective, train: Sequence, batches: int = PROBE_BATCHES,
              directions: int = 4) -> Probe:
    """Probe a prepared model with a throwaway method of ``config`` (its own seed stream, and its ZO mask
    when it has one) on the first ``batches`` training batches."""
    from hyft.engine import masks

    data = batches_of(train, config.batch_size, batches, objective.encode)
    mask = None
    if config.zo_mask and groups.zo:
        def loss(b: int) -> Tensor:
            model.train()
            return objective(data[b % len(data)])
        mask = masks.build(config.zo_mask, groups.zo, config.zo_density, loss, config.mask_batches)
    method = config.spec.rule(model, groups, objective, config, total=1, mask=mask)
    return probe(method, data, directions, config.eps)


def apply(config, result: Probe) -> list[str]:
    """Set the suggested values on ``config`` (groups it has, values the probe could measure)."""
    changed = []
    for key in ("lr_zo", "lr_fo", "eps"):
        value = getattr(result, key)
        if value is not None and value > 0:
            setattr(config, key, float(f"{value:.3g}"))
            changed.append(f"{key}={getattr(config, key):g}")
    return changed
