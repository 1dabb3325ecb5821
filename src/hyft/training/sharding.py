"""FSDP2 sharding of a run (``--shard fsdp``): PyTorch's ``fully_shard`` on every decoder block and on the
root, sharded checkpoints of the directly trained weights and their optimizer with
``torch.distributed.checkpoint`` (any process count can load them), and the whole model gathered for saving.

The ZO side needs nothing from here beyond the DTensor weights: :mod:`hyft.engine.sharded` perturbs and updates
each process's rows. Every all-gather and reduce-scatter FSDP2 issues is counted in the communicator's
``shard`` group (the payload this process hands to it: its rows for a gather, the unit's gradient for a
reduce-scatter), so a run reports what sharding sent.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

from hyft.distributed import Communicator
from hyft.errors import HyftError

MODES = ("none", "fsdp")


class _CountedAllGather(DefaultAllGather):
    def __init__(self, comm: Communicator):
        self.comm = comm

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.comm.sent["shard"] += input_tensor.numel() * input_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, async_op)


class _CountedReduceScatter(DefaultReduceScatter):
    def __init__(self, comm: Communicator):
        self.comm = comm

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.comm.sent["shard"] += input_tensor.numel() * input_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: modules of the classes transformers names in ``_no_split_modules`` (what
    accelerate's FSDP auto-wrap policy shards too)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    return [m for m in found if not any(m is not o and any(x is m for x in o.modules()) for o in found)]


def shard(model: nn.Module, comm: Communicator, device: torch.device) -> nn.Module:
    """``fully_shard`` every decoder block, then the root, over all processes (rows of every weight split
    evenly, FSDP2's Shard(0)). Must run after PEFT is attached, so that φ is sharded with its block."""
    units = blocks(model)
    if not units:
        raise HyftError(f"--shard fsdp needs decoder blocks to shard; {type(model).__name__} names none in "
                        "_no_split_modules")
    mesh = init_device_mesh(device.type, (comm.world,))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    # the root is resharded after every forward too (FSDP2 keeps it gathered by default): the ZO engine writes
    # the sharded rows between forwards, and a root left gathered would not see them
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(_CountedAllGather(comm))
            module.set_custom_reduce_scatter(_CountedReduceScatter(comm))
    return model


def save(path: Path, model: nn.Module, direct: list[tuple[str, nn.Parameter]],
         optimizer: torch.optim.Optimizer | None) -> None:
    """Every process writes its shards of the direct weights and of the optimizer's state into ``path`` (a new
    folder: the checkpoint that names it is written after, so an interrupted save never replaces a good one)."""
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    dcp.save(_state(model, direct, optimizer), checkpoint_id=str(path))


def load(path: Path, model: nn.Module, direct: list[tuple[str, nn.Parameter]],
         optimizer: torch.optim.Optimizer | None) -> None:
    """Read :func:`save`'s folder into this run's shards, whatever the process count that wrote it."""
    if not path.is_dir():
        raise HyftError(f"the sharded checkpoint {path} is missing; the run directory is incomplete")
    state = _state(model, direct, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _state(model: nn.Module, direct: list[tuple[str, nn.Parameter]],
           optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    state: dict[str, Any] = {"direct": {name: p for name, p in direct}}
    if optimizer is not None:  # allocates a fresh optimizer's state, for a load to fill
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on process 0 (CPU; empty elsewhere), for ``save_pretrained``."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

