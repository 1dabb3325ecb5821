"""Peak memory of this process: resident set on CPU, allocated memory on CUDA."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    """This process's peak resident set. Linux's VmHWM belongs to the process image (ru_maxrss would
    carry over the parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def reset_peak_rss() -> float | None:
    """Start a new peak resident set from the current one (Linux: ``5 > /proc/self/clear_refs`` resets VmHWM), so
    that a later :func:`peak_rss_mb` covers only what follows; returns the peak so far (None: cannot reset)."""
    before = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return before
