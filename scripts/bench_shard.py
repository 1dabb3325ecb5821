"""Sharded rows of BENCHMARKS.md (issue #29): per-rank peak memory, step time and bytes sent per step of
``hyft train`` with one unsharded process and with ``--shard fsdp`` over N processes, for zo-full and hybrid
(``--zo-dist lowrank``: with low-rank directions).

    python scripts/bench_shard.py --model smollm2-135m --out runs/bench-shard-smollm2
    python scripts/bench_shard.py --model runs/llama-1b-random-bf16 --dtype bfloat16 --batch-size 2 \\
        --max-length 32 --out runs/bench-shard-1b

Each cell is a short real run (SST-2, a few steps, no dev evaluation until the end); step time is the median
of its steps after the first. Peak RSS is given for the whole process, for set-up (loading, sharding) and
from the end of set-up on, per rank; bytes per step are the run's totals over its steps (its start and final evaluation
included). Prints a markdown table and writes it with the raw numbers to OUT/table.md and
OUT/rows.json. Seconds compare only within one host and one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from hyft.rundir import read_jsonl
from hyft.tools.bench.memory import MMAP_THRESHOLD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cell(args: argparse.Namespace, method: str, world: int, out: Path) -> dict:
    shard = "fsdp" if world > 1 else "none"
    train = ["-m", "hyft", "train", "--model", args.model, "--dtype", args.dtype, "--method", method,
             "--task", "sst2", "--num-train", str(8 * args.batch_size), "--num-dev", "2", "--num-test", "2",
             "--eval-batch-size", "2", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--max-length", str(args.max_length), "--eval-every", "0", "--checkpoint-every", "0",
             "--no-zero-shot", "--no-progress", "--zo-dist", args.zo_dist, "--shard", shard, "--overwrite",
             "--out", str(out)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
              "127.0.0.1", "--master-port", str(free_port())] if world > 1 else [sys.executable]
    # glibc's mmap threshold fixed at 256 KiB, as `hyft bench` does: freed blocks (FSDP2's gathered units) go back
    # to the OS, so the peak RSS is the live peak, not the allocator's free lists
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)), "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    proc = subprocess.run([*launch, *train], capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{method} N={world} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    seconds = [r["seconds"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r][1:]
    sent = results["communication"]["bytes_per_step"]
    peaks = results.get("peak_rss_mb_ranks") or [results["peak_rss_mb"]]
    train = results.get("train_peak_rss_mb_ranks") or [results["train_peak_rss_mb"]]
    setup = results.get("setup_peak_rss_mb_ranks") or [results.get("setup_peak_rss_mb")]
    label = method if args.zo_dist == "gaussian" else f"{method} ({args.zo_dist})"
    return {"method": label, "world": world, "shard": shard, "median_step_s": round(statistics.median(seconds), 3),
            "peak_rss_mb_ranks": peaks, "setup_peak_rss_mb_ranks": setup, "train_peak_rss_mb_ranks": train,
            "bytes_per_step": sent,
            "steps": len(seconds) + 1, "threads_per_rank": env["OMP_NUM_THREADS"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=["zo-full", "hybrid"])
    parser.add_argument("--zo-dist", default="gaussian", help="directions: gaussian (MeZO), rademacher or lowrank "
                        "(rank 2, V held 50 steps: hyft's defaults)")
    parser.add_argument("--out", default="runs/bench-shard")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_cell(args, m, n, out / f"{m}-{args.zo_dist}-n{n}") for m in args.methods for n in args.worlds]
    lines = ["| method | processes | sharding | median step (s) | peak RSS per rank, whole run (MB) | peak RSS per "
             "rank in set-up (MB) | peak RSS per rank after set-up (MB) | sent per step per rank: ZO / FO / shard "
             "(bytes) |", "|---" * 8 + "|"]
    for r in rows:
        b = r["bytes_per_step"]
        lines.append(f"| {r['method']} | {r['world']} | {r['shard']} | {r['median_step_s']} | "
                     f"{' / '.join(f'{m:,.0f}' for m in r['peak_rss_mb_ranks'])} | "
                     f"{' / '.join('—' if m is None else f'{m:,.0f}' for m in r['setup_peak_rss_mb_ranks'])} | "
                     f"{' / '.join(f'{m:,.0f}' for m in r['train_peak_rss_mb_ranks'])} | "
                     f"{b['zo']:,.0f} / {b['fo']:,.0f} / {b.get('shard', 0):,.0f} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "rows.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
