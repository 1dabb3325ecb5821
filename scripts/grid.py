"""Run a method × task × seed grid resumably, append to one results file, render the table and plots.

    python scripts/grid.py run configs/grid.yaml            # runs what is missing, one run at a time
    python scripts/grid.py render configs/grid.yaml         # markdown table + comparison plots

The grid file has ``base`` (RunConfig keys shared by all runs), ``out`` (directory) and ``runs``: a list
of {name, ...RunConfig overrides}; ``seeds: [0, 1, 2]`` repeats every run per seed. A run whose name is
already in ``<out>/results.jsonl`` is skipped and an interrupted one resumes from its checkpoint, so the
grid can be stopped and extended (more seeds, a faster machine) and rerun.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml


def expand(grid: dict[str, Any]) -> list[dict[str, Any]]:
    runs = []
    for seed in grid.get("seeds", [0]):
        for run in grid["runs"]:
            config = {**grid.get("base", {}), **{k: v for k, v in run.items() if k != "name"}, "seed": seed}
            runs.append({"name": f"{run['name']}-s{seed}", "config": config})
    return runs


def command(config: dict[str, Any], out: Path) -> str:
    flags = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            flags.append(f"{flag} {' '.join(map(str, value))}")
        elif value is not None:
            flags.append(f"{flag} {value}")
    return f"hyft train {' '.join(flags)} --out {out}"


def done_names(results: Path) -> set[str]:
    if not results.is_file():
        return set()
    return {json.loads(line)["name"] for line in results.read_text().splitlines() if line.strip()}


def run_grid(grid: dict[str, Any], only: str | None) -> None:
    out = Path(grid["out"])
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    for run in expand(grid):
        if run["name"] in done_names(results) or (only and only not in run["name"]):
            continue
        run_dir = out / run["name"]
        cmd = command(run["config"], run_dir)
        print(f"[grid] {run['name']}: {cmd}", flush=True)
        exe = str(Path(sys.executable).parent / "hyft")
        if (run_dir / "checkpoint.pt").is_file():  # an interrupted run: continue it rather than start over
            argv = [exe, "train", "--resume", str(run_dir), "--no-progress"]
        else:
            argv = [exe, *shlex.split(cmd)[1:], "--overwrite", "--no-progress"]
        proc = subprocess.run(argv, check=False)
        if proc.returncode != 0:
            print(f"[grid] {run['name']} failed with exit code {proc.returncode}; continuing", flush=True)
            continue
        record = json.loads((run_dir / "results.json").read_text())
        record.update(name=run["name"], command=cmd, run_dir=str(run_dir))
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")


def dev_curve(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["dev_accuracy"]) for r in rows if "dev_accuracy" in r]


def median_step_seconds(run_dir: Path) -> float:
    """Median wall time of a training step: unlike the total, not inflated by a paused or shared machine."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(r["seconds"] for r in rows if "seconds" in r and "loss" in r)


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target), None)


def render(grid: dict[str, Any]) -> str:
    out = Path(grid["out"])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    # fo-peft's final dev accuracy per (task, seed) is the bar that "steps to reach" measures against
    bar = {(r["task"], r["seed"]): dev_curve(Path(r["run_dir"]))[-1][1] for r in records if r["method"] == "fo-peft"}
    lines = [
        "| task | method | seed | steps | test acc | zero-shot | best dev (step) | steps to fo-peft's final dev "
        "| train s | median s/step | peak RSS MB | lr_fo | lr_zo | eps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["task"], r["seed"], r["method"])):
        target = bar.get((r["task"], r["seed"]))
        reach = steps_to_reach(dev_curve(Path(r["run_dir"])), target) if target is not None else None
        zs = r.get("zero_shot_test_accuracy")
        lines.append(
            f"| {r['task']} | {r['method']} | {r['seed']} | {r['steps']} | {r['test_accuracy']:.3f} | "
            f"{'' if zs is None else f'{zs:.3f}'} | {r['best_dev_accuracy']:.3f} ({r['best_step']}) | "
            f"{'—' if target is None else (reach if reach is not None else f'not reached ({target:.3f})')} | "
            f"{r['train_seconds']:.0f} | {median_step_seconds(Path(r['run_dir'])):.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r.get('lr_fo') or ''} | {r.get('lr_zo') or ''} | {r.get('eps') or ''} |"
        )
    lines.append("")
    lines.append("Commands:")
    lines.append("")
    for r in sorted(records, key=lambda r: (r["task"], r["seed"], r["method"])):
        lines.append(f"- `{r['name']}`: `{r['command']}`")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    from hyft.plot import plot_runs

    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(Path(r["run_dir"]))
    for task, runs in by_task.items():
        plot_runs(runs, out / f"compare-{task}.png")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "render", "list"])
    parser.add_argument("grid", help="grid YAML file")
    parser.add_argument("--only", default=None, help="run only the runs whose name contains this")
    args = parser.parse_args()
    grid = yaml.safe_load(Path(args.grid).read_text())
    if args.action == "run":
        run_grid(grid, args.only)
        print(render(grid))
    elif args.action == "render":
        print(render(grid))
    else:
        for run in expand(grid):
            print(run["name"], command(run["config"], Path(grid["out"]) / run["name"]))


if __name__ == "__main__":
    main()
