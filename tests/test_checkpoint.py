"""The checkpointer: atomic writes, and checkpoints written before the layered layout still read."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from hyft.errors import HyftError
from hyft.training import checkpoint
from hyft.training.loop import TrainState


def test_a_checkpoint_pickled_under_the_old_module_name_reads(tmp_path):
    """Checkpoints from before the move pickled TrainState as hyft.trainer.TrainState."""
    old = types.ModuleType("hyft.trainer")
    old.TrainState = TrainState
    sys.modules["hyft.trainer"] = old
    TrainState.__module__ = "hyft.trainer"
    try:
        torch.save({"state": TrainState(step=3, zo_updates=5), "method": {"seeds": None}}, tmp_path / "c.pt")
    finally:
        TrainState.__module__ = "hyft.training.loop"
        del sys.modules["hyft.trainer"]
    payload = checkpoint.read(tmp_path / "c.pt")
    assert isinstance(payload["state"], TrainState) and payload["state"].step == 3
    with pytest.raises(ModuleNotFoundError):  # without the mapping it would not load
        torch.load(tmp_path / "c.pt", weights_only=False)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.write_atomic(path, {"step": 1})
    with pytest.raises(HyftError, match="the previous one is kept"):
        checkpoint.write_atomic(tmp_path / "missing-dir" / "checkpoint.pt", {"step": 2})
    assert checkpoint.read(path) == {"step": 1}
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(HyftError, match="cannot read checkpoint"):
        checkpoint.read(tmp_path / "bad.pt")
