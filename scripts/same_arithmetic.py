"""Does a change to ``src/`` leave a run's arithmetic alone? Run the same short runs on two commits.

    python scripts/same_arithmetic.py OLD_COMMIT [--new COMMIT] [--steps 8] [--only NAME]

Each side gets its own git worktree (the working tree itself for ``--new .``) and its own empty
``$HYFT_CACHE``, so the default model is converted by that side's code; the converted models are
compared (safetensors tensor by tensor, as its header's key order may differ; other files byte for
byte). Then every case (a study cell's recorded ``hyft train`` command, shortened to a few steps) runs
on both sides on this host, and their per-step losses, ZO coefficients, dev accuracies and test accuracy
are compared exactly. Only the same host gives the same rounding: run both sides here.
Prints one line per comparison and exits 1 if any differs; a JSON summary goes to ``--out``/summary.json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from hyft.rundir import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
RESULTS = (ROOT / "docs" / "study" / "results.jsonl", ROOT / "docs" / "long" / "results.jsonl")
# Recorded study cells, one per method, the other tasks' scoring paths (COPA: two continuations on their
# own tokens; CB: three candidates) and the long study's low-rank sweeps (zo-full and the fused hybrid);
# each runs its recorded command with SHORT's flags after it.
CELLS = (
    "sst2-fo-peft-s0",
    "sst2-fo-full-s0",
    "sst2-zo-full-s0",
    "sst2-hybrid-s0",
    "sst2-hybrid-new-s0",
    "copa-hybrid-new-s0",
    "cb-hybrid-s0",
    "sweep-zo-lowrank-lr_zo1e-05",  # the long study's low-rank directions (issue #27)
    "sweep-hybrid-lowrank-lr_zo1e-06",  # and its fused low-rank hybrid
)
# V redrawn within the short run: folds happen
EXTRA = {"sweep-zo-lowrank-lr_zo1e-05": "--zo-lazy 3", "sweep-hybrid-lowrank-lr_zo1e-06": "--zo-lazy 3"}
SHORT = "--batch-size 8 --eval-every {half} --eval-dev-examples 60 --num-test 60 --checkpoint-every 0"
FIELDS = ("loss", "zo_coef", "dev_accuracy")


def checkout(commit: str, where: Path) -> Path:
    """The repository root holding ``commit``'s ``src/`` (a detached worktree; '.' is this tree)."""
    if commit == ".":
        return ROOT
    if not where.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(where), commit], cwd=ROOT, check=True)

    def rev(tree: Path, name: str) -> str:
        return subprocess.run(
            ["git", "rev-parse", f"{name}^{{commit}}"], cwd=tree, check=True, capture_output=True, text=True
        ).stdout.strip()

    if rev(where, "HEAD") != rev(ROOT, commit):
        raise SystemExit(f"{where} holds another commit than {commit}: remove it (git worktree remove {where})")
    return where


def cell_args(record: dict) -> list[str]:
    """A results record's ``hyft train`` flags without its output directory."""
    args = shlex.split(record["command"])[2:]
    i = args.index("--out")
    return args[:i] + args[i + 2 :]


def run(tree: Path, cache: Path, name: str, args: list[str], steps: int, out: Path) -> dict:
    """One shortened run on ``tree``'s code; its compared numbers (step → field → value) and test accuracy."""
    run_dir = out / name
    cmd = [
        sys.executable,
        "-m",
        "hyft",
        "train",
        "--no-progress",
        "--overwrite",
        "--out",
        str(run_dir),
        *args,  # argparse keeps a flag's last value: the shortening below wins
        "--steps",
        str(steps),
        *shlex.split(SHORT.format(half=max(1, steps // 2))),
    ]
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "HYFT_CACHE": str(cache)}
    subprocess.run(cmd, env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    numbers = {f"{r['step']}:{k}": r[k] for r in rows for k in FIELDS if k in r}
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test_accuracy", "zero_shot_test_accuracy", "best_dev_accuracy"):
        numbers[key] = results.get(key)
    return numbers


def same_converted_model(left: Path, right: Path) -> tuple[bool, str]:
    """Both sides' converted model directories hold the same files; safetensors compared by tensor.

    A safetensors header is a JSON object whose key order may change with the writer's dict order, so
    the weights file is compared as names, dtypes, values and metadata; the other files byte for byte.
    """
    from safetensors import safe_open

    names = sorted(p.name for p in left.iterdir())
    if names != sorted(p.name for p in right.iterdir()):
        return False, "different files"
    for name in names:
        if name.endswith(".safetensors"):
            with safe_open(left / name, "pt") as a, safe_open(right / name, "pt") as b:
                keys = sorted(a.keys())
                if a.metadata() != b.metadata() or keys != sorted(b.keys()):
                    return False, f"{name}: metadata or tensor names"
                for key in keys:
                    x, y = a.get_tensor(key), b.get_tensor(key)
                    if x.dtype != y.dtype or not x.equal(y):
                        return False, f"{name}: tensor {key}"
        elif not filecmp.cmp(left / name, right / name, shallow=False):
            return False, name
    return True, f"{len(names)} files; safetensors tensor by tensor, the rest byte for byte"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the earlier commit")
    parser.add_argument("--new", default=".", help="the later commit ('.': this working tree)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "same-arithmetic")
    a = parser.parse_args()
    a.out = a.out.resolve()
    sides = {"old": a.old, "new": a.new}
    trees = {s: checkout(c, a.out / f"tree-{s}") for s, c in sides.items()}
    caches = {s: a.out / f"cache-{s}" for s in sides}
    summary: dict = {"old": a.old, "new": a.new, "steps": a.steps, "cases": {}}
    ok = True
    records = {r["name"]: r for path in RESULTS for r in read_jsonl(path)}
    for name in CELLS:
        if a.only not in name:
            continue
        args = cell_args(records[name]) + shlex.split(EXTRA.get(name, ""))
        got = {s: run(trees[s], caches[s], f"{name}-{s}", args, a.steps, a.out) for s in sides}
        diff = sorted(k for k in got["old"].keys() | got["new"].keys() if got["old"].get(k) != got["new"].get(k))
        summary["cases"][name] = {"compared": len(got["old"]), "differ": diff, "new": got["new"]}
        ok &= not diff
        print(f"{name}: {len(got['old'])} numbers, " + (f"DIFFER at {diff[:5]}" if diff else "identical"), flush=True)
    same_model, notes = same_converted_model(*(caches[s] / "smollm2-135m" for s in sides))
    summary["converted_model_identical"] = same_model
    print("converted model: " + ("identical" if same_model else "DIFFERS") + f" ({notes})")
    ok &= same_model
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
