"""Peak memory of one row, measured in a fresh process so that rows do not see each other's peaks:
peak RSS on CPU (the whole process: runtime, weights, activations, temporaries; glibc's mmap threshold set
to 256 KiB so that freed blocks are not counted), and
``torch.cuda.max_memory_allocated`` on CUDA.

    python -m hyft.tools.bench.memory ROW --model M --batch-size 16 --seq-len 64 [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

MMAP_THRESHOLD = 256 * 1024  # bytes: allocations this large are mmap-ed, and unmapped when freed


def measure(row: str, model: str, batch_size: int, seq_len: int, dtype: str, device: str,
            steps: int = 3, autocast: str = "none") -> dict[str, float]:
    """Run ``steps`` steps of ``row`` in a subprocess and return its peaks in MB."""
    cmd = [sys.executable, "-m", "hyft.tools.bench.memory", row, "--model", model, "--batch-size", str(batch_size),
           "--seq-len", str(seq_len), "--dtype", dtype, "--device", device, "--steps", str(steps),
           "--autocast", autocast]
    # glibc keeps freed blocks in its free lists, so without this the same row's peak RSS varied by ±300 MB
    # between runs; returning blocks of ≥ 256 KiB to the OS on free makes the peak the live peak
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run of {row} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from hyft.memory import peak_memory_mb, peak_rss_mb
    from hyft.tools.bench.rows import build_row

    p = argparse.ArgumentParser()
    p.add_argument("row")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--autocast", default="none")
    a = p.parse_args()
    row = build_row(a.row, a.model, a.batch_size, a.seq_len, a.dtype, a.device, timed=False,
                    autocast=a.autocast)
    loaded = peak_rss_mb()
    for _ in range(a.steps):
        row.step()
    peaks = {"peak_rss_mb": peak_rss_mb(), "loaded_rss_mb": loaded}
    device = torch.device(a.device)
    if device.type == "cuda":
        peaks["cuda_peak_mb"] = peak_memory_mb(device)
    print(json.dumps(peaks))


if __name__ == "__main__":
    main()
