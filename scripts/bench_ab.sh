#!/bin/bash
# ABAB: the bench rows on an old commit (its worktree from scripts/same_arithmetic.py, runs/same_arith/tree-old)
# and this tree (new), alternating on one quiet host, then the table in BENCHMARKS.md:
#   bash scripts/bench_ab.sh            # ~18 min on 2 cores
set -euo pipefail
ROWS="forward fo-peft zo-full zo-full-in-place hybrid-two-sided hybrid-two-sided-separate"
for i in 1 2; do
  PYTHONPATH=runs/same_arith/tree-old/src .venv/bin/python -m hyft bench --rows $ROWS --repeats 5 --warmup 1 --no-memory --out runs/bench-old-$i
  .venv/bin/python -m hyft bench --rows $ROWS --repeats 5 --warmup 1 --no-memory --out runs/bench-new-$i
done
.venv/bin/python - "$ROWS" <<'PY'
import json, sys
rows = sys.argv[1].split()
d = {(s, i): json.load(open(f"runs/bench-{s}-{i}/bench.json"))["rows"] for s in ("old", "new") for i in (1, 2)}
print("| row | old, run 1 | new, run 1 | old, run 2 | new, run 2 | new / old (sum of both runs) | RNG sweeps old / new |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    t = {k: v[r]["seconds"]["total"] for k, v in d.items()}
    ratio = (t["new", 1] + t["new", 2]) / (t["old", 1] + t["old", 2])
    print(f"| {r} | {t['old', 1]:.2f} | {t['new', 1]:.2f} | {t['old', 2]:.2f} | {t['new', 2]:.2f} | {ratio:.3f} | "
          f"{d['old', 1][r]['rng_sweeps']:.2f} / {d['new', 1][r]['rng_sweeps']:.2f} |")
PY
