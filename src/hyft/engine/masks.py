"""Sparse-ZO masks: which elements of each ZO tensor the directions touch, chosen once at the start.

A mask is a sorted list of flat positions per tensor (``k = max(1, round(density·numel))``), stored in
the run directory (``zo-mask.safetensors``, int32 where the tensor allows) so that resume, restore and
replay use exactly the same elements. Adding a rule is one function and one line in MASKS.
- ``magnitude`` (Sparse-MeZO): the k smallest-magnitude weights of each tensor at the start.
- ``sensitivity`` (SensZOQ): the k weights of each tensor with the largest sum of squared gradients over
  a few batches; each gradient is folded into a running score as soon as it is accumulated and freed, so
  the full model's gradient never exists at once.
Selecting by module (``--zo-params`` regex) composes with both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from hyft import rundir
from hyft.engine.zo import canonical_name
from hyft.errors import HyftError

Params = list[tuple[str, nn.Parameter]]
MASK_FILE = rundir.MASK_FILE


def keep(numel: int, density: float) -> int:
    return max(1, min(numel, round(density * numel)))


def _positions(scores: Tensor, k: int, largest: bool) -> Tensor:
    return torch.topk(scores.reshape(-1), k, largest=largest, sorted=False).indices.sort().values


def magnitude(params: Params, density: float, **_: object) -> list[Tensor]:
    return [_positions(p.detach().abs().float(), keep(p.numel(), density), largest=False) for _, p in params]


def sensitivity(params: Params, density: float, loss: Callable[[int], Tensor] | None = None, batches: int = 4,
                **_: object) -> list[Tensor]:
    """``loss(b)``: the training loss of batch b with autograd; θ's gradients go only into the scores."""
    if loss is None:
        raise HyftError("the sensitivity mask needs training batches")
    scores = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for _, p in params]
    flags = [p.requires_grad for _, p in params]
    handles = []
    for (_, p), score in zip(params, scores, strict=True):
        def fold(param: Tensor, score: Tensor = score) -> None:
            score.add_(param.grad.float().square())
            param.grad = None
        p.requires_grad_(True)
        handles.append(p.register_post_accumulate_grad_hook(fold))
    try:
        for b in range(batches):  # into θ only: φ's gradients must not leak into the first training step
            loss(b).backward(inputs=[p for _, p in params])
    finally:
        for h in handles:
            h.remove()
        for (_, p), flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    return [_positions(s, keep(s.numel(), density), largest=True) for s in scores]


MASKS: dict[str, Callable[..., list[Tensor]]] = {"magnitude": magnitude, "sensitivity": sensitivity}


def build(rule: str, params: Params, density: float, loss: Callable[[int], Tensor] | None = None,
          batches: int = 4) -> list[Tensor]:
    if rule not in MASKS:
        raise HyftError(f"unknown ZO mask {rule!r}; choose one of {', '.join(MASKS)}")
    return MASKS[rule](params, density, loss=loss, batches=batches)


def save(path: Path, params: Params, mask: Sequence[Tensor]) -> None:
    """One int32 (int64 for tensors past 2^31 elements) tensor of positions per ZO tensor, by canonical name."""
    tensors = {canonical_name(n): m.to("cpu", torch.int32 if p.numel() < 2**31 else torch.int64).contiguous()
               for (n, p), m in zip(params, mask, strict=True)}
    save_file(tensors, str(path))


def load(path: Path, params: Params) -> list[Tensor]:
    if not Path(path).is_file():
        raise HyftError(f"the run's ZO mask {path} is missing")
    with safe_open(str(path), "pt", device="cpu") as f:
        names = set(f.keys())
        missing = [canonical_name(n) for n, _ in params if canonical_name(n) not in names]
        if missing:
            raise HyftError(f"{path} has no mask for {', '.join(missing[:3])}")
        return [f.get_tensor(canonical_name(n)).long() for n, _ in params]
