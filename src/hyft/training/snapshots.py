"""Base snapshots: the ZO-trained weights (and their low-precision residuals) saved every K updates, so that
resume, the best-dev restore and export rebuild the base from the nearest snapshot plus at most K logged
updates, reading tensors one at a time into the live model (never a second full model in memory).

A snapshot is ``snapshots/base-<index>.safetensors``, where ``index`` counts the ZO updates it includes;
index 0 is the original model, read from its own safetensors files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from hyft.engine.factory import Engine
from hyft.engine.zo import ZOUpdate, canonical_name

Lookup = Callable[[str], Tensor | None]
_NAME = re.compile(r"base-(\d+)\.safetensors")


class BaseSnapshots:
    """The snapshot files of one run directory."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def indices(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for f in self.directory.iterdir() if (m := _NAME.fullmatch(f.name)))

    def path(self, index: int) -> Path:
        return self.directory / f"base-{index:08d}.safetensors"

    def write(self, engine: Engine, index: int, write: bool = True) -> Path:
        """Save the engine's tensors as the snapshot after ``index`` updates (atomically). A sharded engine
        gathers each tensor (every process calls this; the one with ``write`` writes)."""
        path = self.path(index)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in engine.state_tensors().items()}
        if not write:
            return path
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"zo_updates": str(index)})
        os.replace(tmp, path)
        return path

    def floor(self, index: int) -> int:
        """The largest snapshot index ≤ ``index`` (0: the original model)."""
        return max([i for i in self.indices() if i <= index], default=0)

    def prune(self, keep: Iterable[int]) -> None:
        """Delete snapshots not needed to rebuild any of the indices in ``keep``."""
        needed = {self.floor(i) for i in keep}
        for i in self.indices():
            if i not in needed:
                self.path(i).unlink(missing_ok=True)

    def lookup(self, index: int) -> Lookup:
        handle = safe_open(str(self.path(index)), "pt", device="cpu")
        names = set(handle.keys())
        return lambda name: handle.get_tensor(name) if name in names else None


def original_lookup(source: str, model: nn.Module, dtype: torch.dtype, names: list[str]) -> Lookup | None:
    """Tensors of the original model by canonical name, read from the safetensors files of the model
    directory ``source`` (tied weights found under any of their names); None if it has none or if any of
    ``names`` is stored under another key (checkpoints whose keys transformers renames on load)."""
    directory = Path(source)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = {name: directory / f for name, f in json.loads(index.read_text())["weight_map"].items()}
    elif (directory / "model.safetensors").is_file():
        handle = safe_open(str(directory / "model.safetensors"), "pt", device="cpu")
        files = dict.fromkeys(handle.keys(), directory / "model.safetensors")
    else:
        return None
    handles: dict[Path, object] = {}
    aliases = tied_aliases(model)
    if not all(any(alias in files for alias in aliases.get(name, [name])) for name in names):
        return None

    def lookup(name: str) -> Tensor | None:
        for alias in aliases.get(name, [name]):
            if alias in files:
                f = files[alias]
                if f not in handles:
                    handles[f] = safe_open(str(f), "pt", device="cpu")
                return handles[f].get_tensor(alias).to(dtype)  # type: ignore[attr-defined]
        return None

    return lookup


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Canonical name → every canonical name of the same tensor (a tied embedding is stored once, under
    either name)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(canonical_name(name))
    return {n: names for names in by_id.values() for n in names}


@torch.no_grad()
def rebuild(engine: Engine, snapshots: BaseSnapshots, updates: list[ZOUpdate], index: int,
            original: Callable[[], Lookup] | None) -> int:
    """Set the engine's tensors to the base after ``updates[:index]``: load the nearest snapshot at or
    below ``index`` (else the original weights; ``original=None``: the engine already holds them) and
    replay the rest. Returns how many updates were replayed."""
    start = snapshots.floor(index)
    if start:
        engine.load_state_tensors(snapshots.lookup(start))
    elif original is not None:
        engine.load_state_tensors(original())
    for u in updates[start:index]:
        engine.update(u)
    return index - start


def check_device(header: dict[str, Any], device: torch.device, log: Callable[[str], None]) -> None:
    """Directions are bitwise identical on every device kind except the last ulp of the Gaussian transform:
    say so when a log is continued or replayed on another kind."""
    written = header.get("device", "cpu")
    if written != device.type and header.get("dist") == "gaussian":
        log(f"note: this ZO log was written on {written} and is replayed on {device.type}: Gaussian directions "
            "agree to ~1e-6 relative there, so the rebuilt base matches to that tolerance, not bitwise")
