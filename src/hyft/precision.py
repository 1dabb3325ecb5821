"""Number formats: the weights' dtypes, and mixed precision (forwards in a lower precision over float32
weights) as one context that every forward of a run enters."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from hyft.errors import HyftError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = ("none", "bfloat16")  # float16 would need loss scaling (a GradScaler), which hyft does not do


def autocast(name: str, device: torch.device | str) -> AbstractContextManager:
    """Mixed precision: forwards computed in ``name`` (torch.autocast; "none": as the weights are) while the
    weights, their gradients and every update stay in the weights' dtype, as transformers' ``--bf16`` does."""
    if name not in AUTOCAST:
        raise HyftError(f"unknown autocast {name!r}; choose one of {', '.join(AUTOCAST)}")
    if name == "none":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[name])
