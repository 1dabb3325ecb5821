"""Data-parallel step time and traffic: the same SST-2 run as 1 × 1, N × 1 and 1 × N (processes × threads).

    python scripts/dp_bench.py --out runs/dp-bench            # SmolLM2, batch 16, 12 steps per run
    python scripts/dp_bench.py --out runs/dp-bench --render   # the markdown table again, from the runs

Every run is ``torchrun --nproc-per-node P -m hyft train ...`` with OMP_NUM_THREADS = threads per process, so
the N × 1 and 1 × N rows use the same N cores. Step time is the median of the logged step seconds after the
first two steps (rank 0's clock); bytes per step are what the run counted going into its collectives, by
parameter group (results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

METHODS = ("fo-peft", "hybrid", "zo-full", "fo-full")


def run(method: str, nproc: int, threads: int, out: Path, steps: int, batch: int, model: str) -> Path:
    path = out / f"{method}-n{nproc}-t{threads}"
    if (path / "results.json").is_file():
        return path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", "29533",
           "-m", "hyft", "train", "--model", model, "--method", method, "--task", "sst2", "--steps", str(steps),
           "--batch-size", str(batch), "--eval-every", "0", "--eval-dev-examples", "16", "--num-test", "16",
           "--no-zero-shot", "--no-progress", "--checkpoint-every", "0", "--out", str(path), "--overwrite"]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return path


def row(path: Path) -> dict:
    steps = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    results = json.loads((path / "results.json").read_text())
    comm = results["communication"]
    return {"seconds": statistics.median(r["seconds"] for r in steps[2:]), "bytes": comm["bytes_per_step"],
            "full": comm["full_gradient_bytes_per_step"], "fo": results["trainable_fo"]}


def render(out: Path, configs: list[tuple[int, int]]) -> str:
    lines = ["| method | processes × threads | s / step (rank 0, median) | speed-up vs 1 × 1 | ZO bytes / step | "
             "FO bytes / step | control bytes / step | a full-gradient all-reduce |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        base = None
        for nproc, threads in configs:
            path = out / f"{method}-n{nproc}-t{threads}"
            if not (path / "results.json").is_file():
                continue
            r = row(path)
            base = base or (r["seconds"] if (nproc, threads) == (1, 1) else None)
            speed = f"{base / r['seconds']:.2f}×" if base else "–"
            b = r["bytes"]
            lines.append(f"| {method} | {nproc} × {threads} | {r['seconds']:.3f} | {speed} | {b['zo']:,.0f} | "
                         f"{b['fo']:,.0f} | {b['control']:,.0f} | {r['full']:,} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/dp-bench")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--render", action="store_true", help="only print the table of the finished runs")
    args = p.parse_args()
    out = Path(args.out)
    configs = [(1, 1), (args.nproc, 1), (1, args.nproc)]
    if not args.render:
        for method in args.methods:
            for nproc, threads in configs:
                run(method, nproc, threads, out, args.steps, args.batch_size, args.model)
    print(render(out, configs))


if __name__ == "__main__":
    main()
