"""A run's training loss and FO gradient norm in windows of steps, and its dev evaluations: where a run
collapsed, and whether a gradient spike came first.

    python scripts/loss_windows.py RUN_DIR_OR_METRICS_JSONL [--window 20] [--from 1] [--to 300]

Prints one line per window: its steps, the median loss, and the median and largest ``grad_norm`` (the FO
gradient's norm before any clip; "-" for runs logged before hyft recorded it), then each dev row in range.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from hyft.rundir import read_jsonl


def windows(rows: list[dict], window: int, first: int, last: int) -> list[str]:
    steps = [r for r in rows if "loss" in r and r["loss"] is not None and first <= r["step"] <= last]
    out = []
    for i in range(0, len(steps), window):
        part = steps[i:i + window]
        norms = [r["grad_norm"] for r in part if r.get("grad_norm") is not None]
        norm = f"{statistics.median(norms):.2f} / {max(norms):.1f}" if norms else "-"
        loss = statistics.median(r["loss"] for r in part)
        out.append(f"steps {part[0]['step']:>5}-{part[-1]['step']:<5} loss {loss:.3f}   grad_norm median / max {norm}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="a run directory or its metrics.jsonl")
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--from", dest="first", type=int, default=1)
    parser.add_argument("--to", dest="last", type=int, default=10**9)
    args = parser.parse_args()
    path = args.metrics / "metrics.jsonl" if args.metrics.is_dir() else args.metrics
    rows = read_jsonl(path)
    for line in windows(rows, args.window, args.first, args.last):
        print(line)
    for r in rows:
        if any(k.startswith("dev_") for k in r) and args.first <= r["step"] <= args.last:
            print(f"dev at step {r['step']}: " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in r.items()
                                                            if k.startswith("dev_")))


if __name__ == "__main__":
    main()
