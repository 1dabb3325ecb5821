"""Where a bench row's step time goes, by torch.profiler: the question the first GPU lease left open (the
hyft engine's zo-full step took 4.1x as long as the MeZO reference on an H200, and drawing z was ~0.03 s of
its 0.2 s in perturb and update; BENCHMARKS.md).

For each row it builds the row as ``hyft bench`` does, unobserved (no split timer), runs ``--warmup`` steps,
then profiles ``--steps`` steps: the wall time per step, the counts of kernel
launches and device synchronisations per step, and the ops by self device time (self CPU time on a CPU). Each
row is appended to ``OUT/profile.txt`` as it finishes, so a time limit loses only the row it cut:

    python scripts/gpu_profile.py --model runs/llama-1b-random-bf16 --dtype bfloat16 --device cuda \\
        --rows mezo zo-full-in-place zo-full-stochastic --out $OUT/profile
    python scripts/gpu_profile.py --model <tiny model dir> --device cpu --rows mezo zo-full --out runs/prof  # here
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hyft.tools.bench.rows import build_row

LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNC = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def profile_row(name: str, args: argparse.Namespace, out: Path) -> str:
    row = build_row(name, args.model, args.batch_size, args.seq_len, args.dtype, args.device, timed=False)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        row.step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            row.step()
        sync()
        wall = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    per_step = {kind: sum(e.count for e in events if e.key in names) / args.steps
                for kind, names in (("launches", LAUNCH), ("syncs and copies", SYNC))}
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    summary = (f"{name}: {wall:.4f} s/step (profiled, {args.steps} steps after {args.warmup} warm-up); per step: "
               + ", ".join(f"{v:,.0f} {k}" for k, v in per_step.items()))
    with open(out / "profile.txt", "a") as f:
        f.write(summary + "\n\n" + events.table(sort_by=sort, row_limit=args.top) + "\n\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", nargs="+", default=["mezo", "zo-full-in-place"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25, help="ops listed per row")
    parser.add_argument("--out", default="runs/profile")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").unlink(missing_ok=True)
    for name in args.rows:
        print(profile_row(name, args, out), flush=True)


if __name__ == "__main__":
    main()
