"""What a checkpoint holds, how it is written (atomically) and how it is restored, for both trainers.

The CLI's loop writes one ``checkpoint.pt`` with everything; ``HybridTrainer`` writes only the ZO part
(:func:`zo_state`) into each of the Trainer's ``checkpoint-N`` folders, beside the Trainer's own model,
optimizer, scheduler and per-rank RNG files. In both, the base weights θ are never stored: they are the
original weights plus the first ``zo_updates`` lines of the ZO log (and the nearest base snapshot).
"""

from __future__ import annotations

import os
import pickle
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hyft.errors import HyftError

if TYPE_CHECKING:
    from hyft.distributed import Communicator
    from hyft.methods import Method

# Modules of classes pickled into checkpoints before the layered layout (TrainState, Snapshot): such a
# checkpoint still resumes.
MOVED = {"hyft.trainer": "hyft.training.loop"}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        return super().find_class(MOVED.get(module, module), name)


_PICKLE = types.ModuleType("hyft_checkpoint_pickle")
_PICKLE.Unpickler = _Unpickler  # type: ignore[attr-defined]
_PICKLE.load = pickle.load  # type: ignore[attr-defined]


def write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` through a temporary file and a rename: an interrupted write never replaces the
    previous checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk or a missing folder as RuntimeError
        tmp.unlink(missing_ok=True)
        raise HyftError(f"cannot write checkpoint {path} ({err}); the previous one is kept") from err


def read(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at ``path``; ``mmap``: tensors stay in the file until touched (to read only counters)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE, mmap=mmap)
    except Exception as err:  # a truncated or foreign file
        raise HyftError(f"cannot read checkpoint {path} ({err})") from err


def zo_state(method: Method, zo_updates: int, residuals: list[Tensor | None] | None) -> dict[str, Any]:
    """The method's side of a checkpoint: its direction-seed stream and FO optimizer, how many ZO-log lines
    it covers, and for a ZO group no base snapshot holds its whole low-precision ``residuals`` (from
    ``engine.whole_residuals()``, which every process calls when sharded; None otherwise) and the engine's
    extra state (low-rank: the pending updates A and V's period)."""
    engine = method.engine
    extra = None
    if residuals is not None and engine is not None:
        residuals = [None if r is None else r.to("cpu", copy=True) for r in residuals]
        extra = {k: v.to("cpu", copy=True) for k, v in engine.extra_tensors().items()}  # low-rank: A, period
    return {"method": method.state_dict(), "zo_updates": zo_updates, "residuals": residuals, "extra": extra}


def restore_zo_state(method: Method, state: dict[str, Any]) -> int:
    """Load :func:`zo_state` into ``method``; returns the number of ZO-log lines it covers."""
    method.load_state_dict(state["method"])
    if state.get("residuals") and method.engine is not None:  # whole: any process count loads them
        method.engine.load_whole_residuals(state["residuals"])
    if state.get("extra") and method.engine is not None:
        method.engine.load_extra_tensors(state["extra"].get)
    return int(state["zo_updates"] if "zo_updates" in state else state["state"].zo_updates)  # older: in the state


def rng_states(comm: Communicator, device: torch.device) -> dict[str, Any]:
    """Every rank's torch RNG (CPU, and CUDA on a GPU), gathered for rank 0 to write."""
    cuda = device.type == "cuda"
    states = comm.all_gather_object((torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None))
    return {"torch_rng": states[0][0], "torch_rng_ranks": [cpu for cpu, _ in states],
            "cuda_rng_ranks": [gpu for _, gpu in states]}


def restore_rng(payload: dict[str, Any], comm: Communicator, device: torch.device, reseed: int) -> None:
    """This rank's RNG from ``payload``; resumed with another process count, rank 0 continues its stream and
    the others start the fresh stream seeded ``reseed``."""
    ranks = payload.get("torch_rng_ranks") or [payload["torch_rng"]]
    gpus = payload.get("cuda_rng_ranks") or [None] * len(ranks)
    same_world = len(ranks) == comm.world
    index = comm.rank if same_world else 0
    torch.set_rng_state(ranks[index])
    if gpus[index] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(gpus[index], device)
    if not same_world and comm.rank:
        torch.manual_seed(reseed)
