"""Data parallelism on ``torch.distributed`` (launched by ``torchrun``): each rank takes its shard of every
global batch; the FO group's gradients are averaged by a bucketed all-reduce; a ZO step sends only its
losses, a few scalars, because every rank draws the same direction from the shared step seed.

Methods see this only as :meth:`Communicator.mean` (the global batch's losses from this rank's) and
:meth:`Communicator.average_grads`. A single process uses the base :class:`Communicator`, whose collectives
are the identity. Every collective counts its payload bytes by group, so a run reports what it sent.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hyft.errors import HyftError

T = TypeVar("T")
BUCKET_BYTES = 25 * 2**20  # gradient all-reduce bucket, DDP's default size
# a collective waiting longer than this for a silent peer fails the run; long, because the others wait in a
# collective while rank 0 alone writes a checkpoint or base snapshot (minutes for a 7B model). A peer that
# dies is noticed at once (its connections close), not after the timeout.
DEFAULT_TIMEOUT_S = 1800


class PeerLost(HyftError):
    """A collective failed: another process died or stopped answering. The process group is then broken, and
    the process should exit without tearing it down (``hyft``'s command line does)."""

    group_broken = True


class Communicator:
    """One process: shards are the whole batch and every collective returns its input."""

    rank, world, backend = 0, 1, None

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()  # payload bytes handed to collectives, by group

    @property
    def is_main(self) -> bool:
        """The rank that writes the run directory, logs and shows progress."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice of a global batch (all slices have the same size)."""
        if len(items) % self.world:
            raise HyftError(f"a batch of {len(items)} examples cannot be split evenly over {self.world} processes; "
                            f"use a batch size divisible by {self.world}")
        n = len(items) // self.world
        return list(items[self.rank * n:(self.rank + 1) * n])

    def mean(self, values: Sequence[float], group: str = "zo") -> list[float]:
        """The mean over ranks of each value: with equal shards, the global batch's mean loss."""
        return [float(v) for v in values]

    def sum_(self, tensor: Tensor, group: str) -> Tensor:
        """All-reduce (sum) in place."""
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop request, collectively decided)."""
        return self.max(int(flag)) > 0

    def max(self, value: int) -> int:
        """The largest of the ranks' values, on every rank."""
        return value

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (e.g. each rank's RNG state for a checkpoint)."""
        return [obj]

    def average_grads(self, params: Sequence[nn.Parameter], group: str = "fo") -> None:
        """Replace each gradient by its mean over ranks."""

    def broadcast_(self, tensors: Sequence[Tensor], group: str = "setup") -> None:
        """Copy rank 0's values into every rank's tensors."""

    def broadcast_object(self, obj: T) -> T:
        return obj

    def barrier(self) -> None:
        """Wait for every rank (e.g. before reading a file that rank 0 writes)."""

    def fingerprints(self, tensors: Sequence[Tensor]) -> list[int]:
        """Every rank's :func:`fingerprint` of ``tensors``: equal values mean bitwise-equal replicas."""
        return [fingerprint(tensors)]

    def close(self) -> None:
        pass

    @contextmanager
    def around(self, what: str) -> Iterator[None]:
        """Work that runs collectives this class does not issue itself (FSDP2's, DCP's): see :class:`Sharded`."""
        yield


class DataParallel(Communicator):
    """A rank of a ``torch.distributed`` process group (gloo on CPU, nccl on CUDA)."""

    def __init__(self, device: torch.device, owned: bool = False) -> None:
        super().__init__()
        self.owned = owned  # this object joined the group, so it leaves it in ``close``
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        # nccl moves CUDA tensors only; gloo moves CPU tensors
        self.device = device if self.backend == "nccl" else torch.device("cpu")

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, ValueError) as err:  # DistBackendError and gloo's connection errors
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise PeerLost(f"rank {self.rank} of {self.world}: {what} failed, another process has died or stopped "
                           f"answering ({reason})") from err

    def _count(self, tensor: Tensor, group: str) -> None:
        self.sent[group] += tensor.numel() * tensor.element_size()

    def sum_(self, tensor: Tensor, group: str, op: Any = None) -> Tensor:
        moved = tensor.to(self.device)
        self._count(moved, group)
        with self._collective(f"all-reduce ({group})"):
            dist.all_reduce(moved, op=dist.ReduceOp.SUM if op is None else op)
            if moved is not tensor:
                tensor.copy_(moved)
            if moved.is_cuda:  # nccl returns before the work is done: a lost peer must fail here, not later
                torch.cuda.synchronize(moved.device)
        return tensor

    def mean(self, values: Sequence[float], group: str = "zo") -> list[float]:
        t = self.sum_(torch.tensor([float(v) for v in values], dtype=torch.float64), group)
        return (t / self.world).tolist()

    def max(self, value: int) -> int:
        return int(self.sum_(torch.tensor([value], dtype=torch.int32), "control", dist.ReduceOp.MAX).item())

    def all_gather_object(self, obj: T) -> list[T]:
        every: list[Any] = [None] * self.world
        with self._collective("all-gather"):
            dist.all_gather_object(every, obj)
        return every

    def average_grads(self, params: Sequence[nn.Parameter], group: str = "fo") -> None:
        grads = [p.grad for p in params if p.grad is not None]  # the same graph on every rank: the same list
        for bucket in buckets(grads):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            self.sum_(flat, group).div_(self.world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def broadcast_(self, tensors: Sequence[Tensor], group: str = "setup") -> None:
        with torch.no_grad():
            for t in tensors:
                moved = t.detach().to(self.device)
                self._count(moved, group)
                with self._collective(f"broadcast ({group})"):
                    dist.broadcast(moved, src=0)
                if moved is not t:
                    t.copy_(moved)

    def broadcast_object(self, obj: T) -> T:
        box = [obj]
        with self._collective("broadcast"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        with self._collective("barrier"):
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def fingerprints(self, tensors: Sequence[Tensor]) -> list[int]:
        mine = torch.tensor([fingerprint(tensors)], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        with self._collective("all-gather (fingerprints)"):
            dist.all_gather(every, mine)
        return [int(t.item()) for t in every]

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


class Sharded(DataParallel):
    """A rank of a run whose model FSDP2 shards (``--shard fsdp``): FSDP2 itself reduce-scatters and averages
    φ's gradients in the backward, so :meth:`average_grads` has nothing left to do."""

    def average_grads(self, params: Sequence[nn.Parameter], group: str = "fo") -> None:
        pass

    @contextmanager
    def around(self, what: str) -> Iterator[None]:
        """Work that runs FSDP2's or DCP's own collectives: a lost peer there (a torch.distributed error, or
        gloo's connection errors) becomes :class:`PeerLost`; any other error passes through unchanged."""
        try:
            yield
        except (RuntimeError, ValueError) as err:
            text = str(err)
            if isinstance(err, dist.DistError) or any(k in text for k in ("gloo", "NCCL", "Connection", "peer")):
                reason = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
                raise PeerLost(f"rank {self.rank} of {self.world}: {what} failed, another process has died or "
                               f"stopped answering ({reason})") from err
            raise


def buckets(tensors: Sequence[Tensor], limit: int = BUCKET_BYTES) -> Iterator[list[Tensor]]:
    """Consecutive groups of tensors of one dtype and device, each at most ``limit`` bytes (or one tensor)."""
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > limit or t.dtype != bucket[0].dtype or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def fingerprint(tensors: Sequence[Tensor]) -> int:
    """An exact checksum of the tensors' bits (position-weighted sums of their 32-bit words), so that two
    replicas that differ in a single bit almost surely differ here."""
    total = 0
    for i, t in enumerate(tensors):
        words = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        words = torch.nn.functional.pad(words, (0, -words.numel() % 4)).view(torch.int32).to(torch.int64)
        weights = torch.arange(1, words.numel() + 1, dtype=torch.int64) % 65_521
        total = (total * 1_000_003 + int((words * weights).sum()) + i) % (2**61 - 1)
    return total


def launched() -> bool:
    """Started by torchrun (or by hand with its environment) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def connect(device: torch.device, sharded: bool = False) -> Communicator:
    """The communicator of this process: joins (or reuses) the process group when launched with several
    processes (gloo on CPU, nccl on CUDA), otherwise the single-process one. ``sharded`` (FSDP2): a
    :class:`Sharded` rank, in a group of one when not launched by torchrun (FSDP2 needs a group)."""
    kind = Sharded if sharded else DataParallel
    if not launched():
        if not sharded:
            return Communicator()
        if not dist.is_initialized():
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            return kind(device, owned=True)
        return kind(device)
    if not dist.is_available():
        raise HyftError("this torch build has no torch.distributed; run a single process")
    if dist.is_initialized():  # a caller's own group (a script that trains several runs)
        return kind(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("HYFT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    try:
        if backend == "nccl":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, timeout=timeout, device_id=device)
        else:
            dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise HyftError(f"cannot join the process group ({reason}); launch with torchrun") from err
    return kind(device, owned=True)


def rank_device(device: torch.device) -> torch.device:
    """One GPU per rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device.type == "cuda" and launched():
        if device.index is not None:
            raise HyftError(f"--device {device} would put every rank on one GPU; under torchrun use --device cuda "
                            "(rank r takes cuda:LOCAL_RANK)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def describe(comm: Communicator) -> dict[str, Any]:
    return {"world": comm.world, "backend": comm.backend}
