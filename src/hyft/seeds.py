"""Every random stream of a run, derived from its one root seed by :func:`derive_seed`.

A stream is named, never an offset typed where it is used. Two streams keep the closed forms the study's
cells were drawn with (so old runs replay and resume bitwise): the ZO directions, the same on every rank,
and the minibatch order. Rank 0's dropout stream is the root itself (a one-process run seeds torch's global
generator with it). Every other stream (the other ranks' dropout, a rank's dropout after a resume with
another process count) is a 63-bit hash of (root, stream, rank, index), so no two of them meet for any world
size; ``tests/test_seeds.py`` checks world sizes up to 1,024.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Stream = Literal["directions", "sampler", "dropout", "dropout-resharded", "lowrank"]
STREAMS: tuple[Stream, ...] = ("directions", "sampler", "dropout", "dropout-resharded", "lowrank")

# closed forms kept from before this module: the recorded runs depend on them
_LEGACY = {"directions": (1_000_003, 17), "sampler": (7919, 1)}


def derive_seed(root: int, stream: Stream, rank: int = 0, index: int = 0) -> int:
    """The seed of ``stream`` for process ``rank`` of a run with root seed ``root``.

    ``directions`` and ``sampler`` are shared by every rank (rank and index are ignored: every replica must
    draw the same z and walk the same order); ``dropout`` is per rank; ``dropout-resharded`` is per rank and
    per ``index`` (the step a run resumed at with a different number of processes); ``lowrank`` is the root of
    the low-rank directions' V factors (shared by every rank).
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; streams: {', '.join(STREAMS)}")
    if stream in _LEGACY:
        multiplier, offset = _LEGACY[stream]
        return root * multiplier + offset
    if stream == "lowrank":
        rank = 0
    if stream == "dropout" and rank == 0:
        return root
    digest = hashlib.sha256(f"hyft/{stream}/{root}/{rank}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any torch.manual_seed accepts it
