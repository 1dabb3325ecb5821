"""Kernel launches of the ZO engine on an accelerator, counted on the CPU machine: the engine itself runs
on a ``meta`` copy of the model (shapes only, no memory, the accelerator's piece and lookahead sizes) under
a dispatch mode that counts every ATen op that would launch a kernel (views and allocations excluded), plus
the fused device kernels' launches (:mod:`hyft.engine.device_kernel`), counted both without them (torch's
ops, the fallback) and with them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hyft.engine import device_kernel, noise
from hyft.engine.lowrank import LowRankEngine
from hyft.engine.zo import ZOEngine, ZOUpdate, select_params

NO_KERNEL = ("view", "_unsafe_view", "slice", "select", "as_strided", "expand", "t", "transpose", "unsqueeze",
             "squeeze", "permute", "alias", "detach", "empty", "empty_like", "empty_strided", "lift_fresh")


class LaunchCounter(TorchDispatchMode):
    """Counts ATen ops that launch a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NO_KERNEL:
            self.launches += 1
        return func(*args, **(kwargs or {}))


def count(fn: Callable[[], Any]) -> int:
    """ATen ops that launch a kernel, plus fused device-kernel launches, issued by ``fn()``."""
    fused = device_kernel.Launches.count
    with LaunchCounter() as counter:
        fn()
    return counter.launches + device_kernel.Launches.count - fused


def perturbed_forward_launches(engine: ZOEngine | LowRankEngine, model: nn.Module, tokens: int, seed: int = 1,
                               scale: float = 1e-3) -> int:
    """The engine's own launches in one perturbed forward of ``tokens`` tokens: a forward of ``model`` inside
    :meth:`ZOEngine.perturbed` (the engine's hooks, batches and row blocks, not a copy of them) minus the
    same forward without it."""
    device = engine.params[0][1].device
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)

    def perturbed() -> None:
        with engine.perturbed(seed, scale):
            model(input_ids=ids)

    with torch.no_grad():
        plain = count(lambda: model(input_ids=ids))
        return count(perturbed) - plain


def zo_launches(model: nn.Module, tokens: int = 1024) -> dict[str, Any]:
    """Launches per ZO update sweep, per perturbed forward and per two-sided step for ``model`` (on meta)."""
    params = select_params(model)
    engine = ZOEngine(model, params, eps=1e-3, two_sided=True)
    update = count(lambda: engine.update(ZOUpdate(step=0, seed=1, coef=1.0, lr=1e-6)))
    forward = perturbed_forward_launches(engine, model, tokens)
    device = params[0][1].device
    pieces = sum(len(list(noise.pieces(0, p.numel(), device))) for _, p in params)
    previous_chunks = sum(-(-p.numel() // (1 << 18)) for _, p in params)
    with device_kernel.counting_on_meta():
        fused_update = count(lambda: engine.update(ZOUpdate(step=0, seed=1, coef=1.0, lr=1e-6)))
        fused_forward = perturbed_forward_launches(engine, model, tokens)
    return {
        "tensors": len(params), "numel": sum(p.numel() for _, p in params), "dtype": str(params[0][1].dtype),
        "pieces_per_sweep": pieces, "update_sweep": update, "perturbed_forward": forward,
        "two_sided_step": 2 * forward + update, "streamed_modules": len(engine.streamed), "tokens": tokens,
        "previous_scheme_chunks_per_sweep": previous_chunks,
        "fused": {"update_sweep": fused_update, "perturbed_forward": fused_forward,
                  "two_sided_step": 2 * fused_forward + fused_update},
        "mezo_sweep": mezo_sweep_launches(params),
    }


def mezo_sweep_launches(params: list[tuple[str, nn.Parameter]]) -> int:
    """Launches of one sweep of the MeZO reference (``torch.normal`` and ``add_`` per tensor)."""
    from hyft.tools.bench.mezo import MeZOReference

    reference = MeZOReference([p for _, p in params], loss=lambda: torch.zeros(()))
    with torch.no_grad():
        return count(lambda: reference.perturb(1, 1.0))


def llama_7b_launches(dtype: torch.dtype = torch.bfloat16, tokens: int = 1024) -> dict[str, Any]:
    """The count for a Llama-2-7B-shaped model (untied 32k vocabulary), built on meta: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    return {"model": "llama-2-7b shape (meta)", **zo_launches(model, tokens),
            "lowrank": lowrank_launches(model, tokens)}


def lowrank_launches(model: nn.Module, tokens: int = 1024, rank: int = 2, lazy: int = 50) -> dict[str, Any]:
    """Launches of a two-sided step with low-rank directions (both perturbed forwards, the update, and a fold
    every ``lazy`` steps), beyond those of two plain forwards; the engine's hooks are removed after."""
    params = select_params(model)
    device = params[0][1].device
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    engine = LowRankEngine(model, params, rank, lazy, root=0, eps=1e-3)
    engine.begin(0)

    def step(seed: int) -> None:
        with engine.perturbed(seed, 1e-3):
            model(input_ids=ids)
        with engine.perturbed(seed, -1e-3):
            model(input_ids=ids)
        engine.update(ZOUpdate(step=0, seed=seed, coef=1.0, lr=1e-6))

    try:
        with torch.no_grad():
            plain = count(lambda: model(input_ids=ids))
            first = count(lambda: step(1)) - 2 * plain  # no update pending yet
            pending = count(lambda: step(2)) - 2 * plain  # the forwards also carry the pending updates
            fold = count(engine.materialize)
    finally:
        engine.close()
    return {"rank": rank, "lazy": lazy, "matrices": len(engine.matrices), "vectors": len(engine.vectors),
            "first_step": first, "two_sided_step": pending, "fold": fold,
            "two_sided_step_amortised": round(pending + fold / lazy, 1)}
