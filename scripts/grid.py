"""Run a study resumably: dev sweeps, then method × task × seed cells tuned on them; render its report.

    python scripts/grid.py run configs/study.yaml       # runs what is missing, one run at a time
    python scripts/grid.py render configs/study.yaml    # tables + curves from the results file only,
                                                        # written into the README between its markers
    python scripts/grid.py list configs/study.yaml      # every run and its command, in run order
    touch runs/study/PAUSE                              # stop after the current run (rm it to go on)
    python scripts/grid.py run configs/long.yaml --stop-at 22:15   # at 22:15 stop the run (it checkpoints)
                                                        # and park it; an unparkable cell (session_hours)
                                                        # starts only if it fits before then
    python scripts/grid.py park configs/long.yaml       # copy unfinished runs' resumable state into the
                                                        # grid's ``parked`` folder, to be committed

The grid file has ``out`` (run directories), ``results`` (the results file: one JSON line per finished
run, with its dev curve, so rendering needs nothing else), optionally ``logs`` (a folder that receives each
recorded run's whole step log, ``NAME.jsonl``, to be committed), ``base`` (RunConfig keys of every run),
``sweeps`` (name → {method, task, ...fixed keys, ``grid``: {key: [values]}}, every combination run on
seed 0) and ``cells`` (name → {method, tasks, seeds, ``tuned``: a sweep whose best-dev values it takes,
...fixed keys}). A run whose name is in the results file is skipped; an interrupted one resumes from its
checkpoint; a cell whose sweep has not finished waits for it (sweeps run first).

A session's ``runs/`` does not outlive it, so a run longer than a session is *parked*: ``park`` copies each
unfinished run's resumable files (``RunDir.portable_files``: the checkpoint, logs and best-dev weights, no
base snapshots) into ``parked`` (a committed folder), and ``run`` copies them back into ``out`` for any run
that has no checkpoint there. A run whose resumable files exceed ``park_limit_mb`` (fo-full: the whole
model and AdamW's moments) cannot be parked and is said so; such runs must finish within one session
(``--only``/``--exclude`` pick what runs; a cell's ``session_hours`` tells ``--stop-at`` how long it needs).
Each launch appends the host and commit it ran on to the run's ``segments.jsonl``, and the record carries
them: the seconds of a run resumed elsewhere mix hosts.

``--stop-at`` needs a margin before the session's end: the running step, a dev evaluation if one is due (a
minute or two on the long study's 500 examples), the checkpoint and the park copy.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from hyft.tools import stats


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["name"]: r for r in records}


def value_tag(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


SPECIAL = ("grid", "tasks", "seeds", "tuned", "label", "session_hours")
LOWER_IS_BETTER = ("loss", "perplexity")


def grid_metric(grid: dict[str, Any]) -> str:
    """The metric a grid selects and reports by: its ``metric`` key, the tasks' headline metric (``accuracy``
    by default; ``f1`` for SQuAD, ``loss`` for Alpaca), which results.json records as best_dev_<metric>."""
    return grid.get("metric", "accuracy")


def sign(metric: str) -> float:
    """+1 where higher is better, −1 where lower is (a loss): ``sign · value`` is always maximised."""
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def sweep_runs(grid: dict[str, Any], results: dict[str, dict[str, Any]] | None = None, only: str | None = None
               ) -> list[dict[str, Any]]:
    """Every sweep run (or those of sweep ``only``); ``config`` is None while a sweep it is tuned on is
    unfinished."""
    runs = []
    for name, sweep in grid.get("sweeps", {}).items():
        if only is not None and name != only:
            continue
        fixed = {k: v for k, v in sweep.items() if k not in SPECIAL}
        tuned = tuned_values(sweep.get("tuned"), grid, results or {})
        keys = list(sweep["grid"])
        for values in itertools.product(*(sweep["grid"][k] for k in keys)):
            chosen = dict(zip(keys, values, strict=True))
            tag = "-".join(f"{k}{value_tag(v)}" for k, v in chosen.items())
            config = None if tuned is None else {**grid.get("base", {}), **fixed, **tuned, **chosen, "seed": 0}
            runs.append({"name": f"sweep-{name}-{tag}", "sweep": name, "chosen": {**(tuned or {}), **chosen},
                         "config": config})
    return runs


def tuned_values(names: str | list[str] | None, grid: dict[str, Any], results: dict[str, dict[str, Any]]
                 ) -> dict[str, Any] | None:
    """The merged best-dev values of the named sweeps, or None while one of them is unfinished."""
    merged: dict[str, Any] = {}
    for name in [names] if isinstance(names, str) else names or []:
        best = best_of(name, grid, results)
        if best is None:
            return None
        merged.update(best)
    return merged


def best_of(sweep: str, grid: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The chosen values of the sweep's run with the best dev score (the grid's metric; ties: the earlier in
    grid order; a failed run counts as the worst), or None while any of its runs, or a sweep it is tuned on
    (its runs' config is None then), is unfinished."""
    runs = sweep_runs(grid, results, only=sweep)
    if any(r["name"] not in results or r["config"] is None for r in runs):
        return None
    m = grid_metric(grid)

    def score(r: dict[str, Any]) -> float:
        record = results[r["name"]]
        return -float("inf") if record.get("failed") else sign(m) * record[f"best_dev_{m}"]

    best = max(runs, key=score)  # max keeps the first of ties
    return best["chosen"]


def cell_runs(grid: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every cell run, seed-major (all seed-0 runs first); ``config`` is None while its sweep is pending."""
    runs = []
    cells = grid.get("cells", {})
    seeds = sorted({s for cell in cells.values() for s in cell.get("seeds", [0])})
    for seed in seeds:
        for name, cell in cells.items():
            if seed not in cell.get("seeds", [0]):
                continue
            tuned = tuned_values(cell.get("tuned"), grid, results)
            fixed = {k: v for k, v in cell.items() if k not in SPECIAL}
            for task in cell["tasks"]:
                config = None if tuned is None else {**grid.get("base", {}), **fixed, **tuned, "task": task,
                                                     "seed": seed}
                runs.append({"name": f"{task}-{name}-s{seed}", "cell": name, "label": cell.get("label", name),
                             "config": config, "session_hours": cell.get("session_hours")})
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


def curve(run_dir: Path, metric: str = "accuracy") -> list[list[float]]:
    """[step, dev <metric>, training seconds so far] at every dev evaluation."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out, seconds = [], 0.0
    for r in rows:
        if "loss" in r:
            seconds += r["seconds"]
        if f"dev_{metric}" in r:
            out.append([r["step"], r[f"dev_{metric}"], round(seconds, 2)])
    return out


def provenance() -> dict[str, Any]:
    """Where and on what code a run ran: seconds from different hosts or code are not comparable."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in reversed(info))}
    flags = set(field.get("flags", "").split())
    # the widest vector ISA decides MKL's kernels, hence the rounding: runs agree bitwise only on one ISA
    isa = next((f for f in ("amx_tile", "avx512f", "avx2") if f in flags), "")
    return {"commit": git("rev-parse", "--short", "HEAD"), "src_changed": bool(git("status", "--porcelain", "src")),
            "cpu": f"{field.get('model name', '')} (family {field.get('cpu family', '?')}, model "
                   f"{field.get('model', '?')})", "isa": isa, "cores": os.cpu_count(),
            "threads": int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)}  # per-step seconds scale with it


def checkpoint_state(run_dir: Path) -> Any:
    """The TrainState of a run's checkpoint (its tensors left on disk), or None without one."""
    if not (run_dir / "checkpoint.pt").is_file():
        return None
    from hyft.training.checkpoint import read

    return read(run_dir / "checkpoint.pt", mmap=True)["state"]


def checkpoint_step(run_dir: Path) -> int:
    """The step a run would resume from (0 without a checkpoint)."""
    state = checkpoint_state(run_dir)
    return 0 if state is None else int(state.step)


def incomplete(run_dir: Path) -> str | None:
    """What a copy of a run lacks for its checkpoint to resume (None: nothing): the ZO-log lines and metrics
    rows it counts, and its best-dev weights."""
    state = checkpoint_state(run_dir)
    if state is None:
        return "no checkpoint.pt"

    def lines(name: str) -> int:
        path = run_dir / name
        return len(path.read_text().splitlines()) if path.is_file() else 0

    if state.zo_updates and lines("zo_log.jsonl") < 1 + state.zo_updates:
        return f"zo_log.jsonl has {lines('zo_log.jsonl')} lines, the checkpoint counts {1 + state.zo_updates}"
    if lines("metrics.jsonl") < state.metrics_lines:
        return f"metrics.jsonl has {lines('metrics.jsonl')} rows, the checkpoint counts {state.metrics_lines}"
    if state.best is not None and state.best.weights and not (run_dir / state.best.weights).is_file():
        return f"the best-dev weights {state.best.weights} are missing"
    return None


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished copy ``tmp`` at ``target``: the old copy is renamed aside first and deleted last, so an
    interruption leaves one whole copy under a known name."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def segments(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "segments.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def park(grid: dict[str, Any]) -> list[str]:
    """Copy every stopped, unfinished run's resumable files into ``grid['parked']/<name>`` (replacing an older
    copy only once the new one is whole and consistent with its checkpoint); drop the parked copies of recorded
    runs. Stop the run first (SIGTERM: it checkpoints). Returns one line per run."""
    from hyft.rundir import RunDir

    out, parked = Path(grid["out"]), Path(grid["parked"])
    limit = float(grid.get("park_limit_mb", 50)) * 2**20
    results = load_results(Path(grid["results"]))
    said = []
    for stale in sorted(parked.iterdir()) if parked.is_dir() else []:
        if stale.is_dir() and stale.name in results:
            shutil.rmtree(stale)
            said.append(f"{stale.name}: recorded; its parked copy removed")
    for run_dir in sorted(out.iterdir()) if out.is_dir() else []:
        if run_dir.name in results or not (run_dir / "checkpoint.pt").is_file():
            continue
        files = RunDir(run_dir).portable_files()
        size = sum((run_dir / f).stat().st_size for f in files)
        if size > limit:
            said.append(f"{run_dir.name}: NOT parked: its resumable files take {size / 2**20:,.0f} MB (limit "
                        f"{limit / 2**20:,.0f} MB, park_limit_mb); it must finish within one session")
            continue
        tmp = parked / f".{run_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for f in files:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / f, tmp / f)
        if problem := incomplete(tmp):  # e.g. a run still writing: its checkpoint moved on during the copy
            shutil.rmtree(tmp)
            said.append(f"{run_dir.name}: NOT parked: the copy is inconsistent ({problem}); stop the run first")
            continue
        replace_dir(tmp, parked / run_dir.name)
        said.append(f"{run_dir.name}: parked at step {checkpoint_step(parked / run_dir.name)} ({size / 2**20:.1f} MB)")
    return said


def unpark(grid: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[str]:
    """Copy each parked, unrecorded run into ``out`` where ``out`` has no checkpoint of it, or an older one."""
    out, parked = Path(grid["out"]), Path(grid.get("parked", ""))
    said = []
    for source in sorted(parked.iterdir()) if grid.get("parked") and parked.is_dir() else []:
        target = out / source.name
        if not source.is_dir() or source.name.startswith(".") or source.name in results:
            continue
        step = checkpoint_step(source)
        if (target / "checkpoint.pt").is_file() and checkpoint_step(target) >= step:
            continue
        tmp = out / f".{source.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        replace_dir(tmp, target)
        said.append(f"[grid] {source.name}: unparked at step {step} from {source}")
    return said


def launch(argv: list[str], stop_at: float | None = None) -> int:
    """Run ``hyft train`` to its end, or until ``stop_at`` (epoch seconds). Then, or when the grid itself gets
    SIGTERM or Ctrl-C, the child gets SIGTERM: hyft checkpoints at the end of its current step (and dev
    evaluation, if one is due) and exits 143; the grid waits for that, so no child outlives it or is killed
    while writing. (During setup or the final test hyft has no handler yet and dies at once, code -15; its last
    checkpoint is kept.) Returns the exit code."""
    if stop_at is None:
        return subprocess.run(argv, check=False).returncode
    stop, started = [False], []

    def forward(*_: Any) -> None:  # the grid is asked to stop: stop the child first
        stop[0] = True
        for child in started:
            child.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)  # before the child starts: no signal falls between
    try:
        child = subprocess.Popen(argv)
        started.append(child)
        if stop[0]:  # asked to stop while starting it
            child.send_signal(signal.SIGTERM)
        while True:
            try:
                return child.wait(timeout=1.0 if stop[0] else max(0.0, min(60.0, stop_at - time.time())))
            except subprocess.TimeoutExpired:
                if not stop[0] and time.time() >= stop_at:
                    print(f"[grid] --stop-at reached: SIGTERM to {Path(argv[0]).name} (it checkpoints, then exits)",
                          flush=True)
                    forward()
            except KeyboardInterrupt:
                forward()
    finally:
        signal.signal(signal.SIGTERM, previous)


def other_settings(run: dict[str, Any], run_dir: Path) -> str:
    """How the run directory's stored config differs from the cell's, on the keys the cell sets ('' when it
    does not, or there is none). A key missing from an older config.yaml had its default then: hyft adds a
    field only with a default that keeps the old behaviour."""
    if not (run_dir / "config.yaml").is_file():
        return ""
    from hyft.config import RunConfig

    stored = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    wanted, defaults = RunConfig.from_dict(run["config"], source=run["name"]), RunConfig()
    return ", ".join(f"{k}: {stored.get(k, getattr(defaults, k))!r} there, {getattr(wanted, k)!r} in the cell"
                     for k in run["config"] if stored.get(k, getattr(defaults, k)) != getattr(wanted, k))


def run_one(run: dict[str, Any], out: Path, results_path: Path, reuse: bool = False,
            stop_at: float | None = None, logs: Path | None = None) -> None:
    """Run (or resume) one run and append its record; with ``logs``, also copy its whole step log there as
    ``NAME.jsonl`` (committed beside the results, so that claims read off a log can be checked)."""
    run_dir = out / run["name"]
    if differs := other_settings(run, run_dir):  # e.g. the grid file changed since: never record or resume it
        raise SystemExit(f"[grid] {run_dir} was made with other settings ({differs}); it is not this cell's "
                         "run: move it away to run the cell")
    cmd = command(run["config"], run_dir)
    print(f"[grid] {run['name']}: {cmd}", flush=True)
    exe = str(Path(sys.executable).parent / "hyft")
    if (run_dir / "checkpoint.pt").is_file() and not (run_dir / "results.json").is_file():
        argv = [exe, "train", "--resume", str(run_dir), "--no-progress"]  # interrupted: continue it
    elif (run_dir / "results.json").is_file():
        argv = None  # finished but not recorded (stopped between the two): record it
    else:
        argv = [exe, *shlex.split(cmd)[1:], "--overwrite", "--no-progress"]
    same = next((r for r in load_results(results_path).values() if r.get("config") == run["config"]), None)
    # --reuse: a cell identical to a finished sweep run (its winner, seed 0) takes that record instead of
    # running again; off by default, since sweeps may share the machine and their seconds are not clean
    if reuse and same is not None and not same.get("failed"):
        record = {**same, "name": run["name"], "cell": run.get("cell"), "label": run.get("label"),
                  "sweep": run.get("sweep"), "chosen": run.get("chosen"), "reused": same["name"]}
        with results_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return
    where = provenance() if argv is not None else None  # at launch; a run only being recorded ran elsewhen
    resuming = argv is not None and "--resume" in argv

    def segment(first: int) -> None:  # each launch is a segment, with its own host and code
        with (run_dir / "segments.jsonl").open("a") as f:
            f.write(json.dumps({"from_step": first, **(where or {})}) + "\n")

    if resuming:
        segment(checkpoint_step(run_dir))
    code = 0 if argv is None else launch(argv, stop_at)
    if argv is not None and not resuming and run_dir.is_dir():  # after it: a fresh start --overwrite's the folder
        segment(0)
    if code in (130, 137, 143, -2, -9, -15):  # interrupted (checkpoint kept): stop here, resume next time
        raise SystemExit(f"[grid] {run['name']} was interrupted (exit {code}); run the grid again to resume it")
    if code != 0:  # recorded, so that a diverging setting loses its sweep instead of blocking it
        print(f"[grid] {run['name']} failed with exit code {code}", flush=True)
        failed = {"name": run["name"], "failed": True, "exit_code": code, "best_dev_accuracy": -1.0,
                  "command": cmd, "config": run["config"], "sweep": run.get("sweep"), "chosen": run.get("chosen"),
                  "cell": run.get("cell"), "label": run.get("label")}
        with results_path.open("a") as f:
            f.write(json.dumps(failed) + "\n")
        return
    record = json.loads((run_dir / "results.json").read_text())
    record.update(name=run["name"], command=cmd, config=run["config"], curve=curve(run_dir, record["metric"]),
                  cell=run.get("cell"),
                  label=run.get("label"), sweep=run.get("sweep"), chosen=run.get("chosen"), provenance=where)
    if (parts := segments(run_dir)) and (len(parts) > 1 or parts[0]["from_step"]):  # resumed: ``provenance`` is
        # the last launch's; the first one's line is lost only if the grid itself was killed during it
        record["segments"] = parts
    median = statistics.median(json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text()
                               .splitlines() if '"loss"' in line)
    record["median_step_seconds"] = round(median, 3)
    from hyft.methods import METHODS

    if record.get("zo_log_best_index") and METHODS[record["method"]].zo_on_base:  # the ZO updates' reach
        record["base_movement"] = movement(run_dir)
    with results_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "metrics.jsonl", logs / f"{run['name']}.jsonl")


def movement(run_dir: Path) -> float:
    """``hyft.tools.replay.base_movement`` of a finished run, in a fresh process: this one may have imported hyft
    hours before the run started, and the run wrote its config.yaml with the code there now (a key added since
    made the old RunConfig refuse it, and stopped a grid)."""
    code = ("import sys; from hyft.tools.replay import base_movement; "
            "print(base_movement(sys.argv[1], log=lambda _: None))")
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[grid] the base movement of {run_dir} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.split()[-1])


def check(grid: dict[str, Any]) -> None:
    """Every sweep's and cell's fixed keys must make a valid RunConfig (a typo fails now, not hours later)."""
    from hyft.config import RunConfig

    for name, entry in {**grid.get("sweeps", {}), **grid.get("cells", {})}.items():
        fixed = {k: v for k, v in entry.items() if k not in SPECIAL}
        try:
            RunConfig.from_dict({**grid.get("base", {}), **fixed}, source=f"{name}")
        except Exception as err:
            raise SystemExit(f"[grid] {name}: {err}") from err
    labels = {entry.get("label", name) for name, entry in grid.get("cells", {}).items()}
    for key, wanted in (("reference", [grid.get("reference")]), ("baselines", grid.get("baselines", []))):
        for label in wanted:
            if label is not None and label not in labels:
                raise SystemExit(f"[grid] {key}: {label!r} is not a cell's label (labels: {sorted(labels)})")


def fits(run: dict[str, Any], out: Path, stop_at: float | None) -> bool:
    """Can this run start now? A cell with ``session_hours`` (one that cannot be parked: it must finish within
    one session) starts only if what it has left of them (its checkpoint in ``out`` counts) fits before
    ``stop_at``; parkable runs always can."""
    hours = run.get("session_hours")
    if stop_at is None or not hours:
        return True
    done = checkpoint_step(out / run["name"]) / run["config"]["steps"] if run.get("config") else 0.0
    return stop_at - time.time() >= float(hours) * (1 - done) * 3600


def run_grid(grid: dict[str, Any], only: str | None, reuse: bool = False, exclude: str | None = None,
             stop_at: float | None = None) -> None:
    """Run what is missing, in order, one at a time. With ``stop_at``: the run in progress then is stopped
    (it checkpoints) and every unfinished run is parked (when the grid has ``parked``), as after a SIGTERM
    or Ctrl-C to the grid; a cell that cannot be parked is skipped while its ``session_hours`` do not fit
    before ``stop_at``. A stop at ``stop_at`` returns (the report is rendered); other interruptions exit."""
    check(grid)
    out, results_path = Path(grid["out"]), Path(grid["results"])
    out.mkdir(parents=True, exist_ok=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    for line in unpark(grid, load_results(results_path)):
        print(line, flush=True)
    said: set[str] = set()

    def park_all() -> None:
        for line in park(grid) if stop_at is not None and grid.get("parked") else []:
            print(f"[grid] {line}", flush=True)

    while True:
        if (out / "PAUSE").exists():  # `touch OUT/PAUSE`: stop between runs (nothing to redo on resume)
            raise SystemExit(f"[grid] {out / 'PAUSE'} exists: stopped between runs; remove it and run again")
        results = load_results(results_path)
        pending = [r for r in sweep_runs(grid, results) + cell_runs(grid, results)
                   if r["name"] not in results and r["config"] is not None and (not only or only in r["name"])
                   and not (exclude and exclude in r["name"])]
        skipped = [r for r in pending if not fits(r, out, stop_at)]
        for r in skipped:
            if r["name"] not in said:
                said.add(r["name"])
                print(f"[grid] {r['name']}: skipped: it needs {r['session_hours']} h within one session (it "
                      f"cannot be parked) and less is left before --stop-at", flush=True)
        pending = [r for r in pending if r not in skipped]
        if stop_at is not None and time.time() >= stop_at:
            print("[grid] --stop-at reached between runs", flush=True)
            park_all()
            return
        if not pending:
            return
        try:
            run_one(pending[0], out, results_path, reuse, stop_at,
                    Path(grid["logs"]) if grid.get("logs") else None)
        except SystemExit:
            park_all()  # stopped at stop_at, or the grid was signalled: either way the run checkpointed
            if stop_at is not None and time.time() >= stop_at:
                print(f"[grid] stopped at --stop-at: {pending[0]['name']} checkpointed; run the grid again to "
                      "resume it", flush=True)
                return
            raise


# --- the report ------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], fmt: str = ".3f") -> str:
    """Mean ± sample std (n − 1) over seeds; a single seed shows its value alone, since it has no spread."""
    mean, sd = mean_std(values)
    return f"{mean:{fmt}} ± {sd:.3f}" if len(values) > 1 else f"{mean:{fmt}}"


def reach(curve_: list[list[float]], target: float, direction: float = 1.0) -> tuple[float, float] | None:
    """(steps, seconds) of the first dev evaluation at or above ``target`` (at or below, ``direction`` −1)."""
    return next(((s, t) for s, acc, t in curve_ if direction * acc >= direction * target - 1e-9), None)


def render(grid: dict[str, Any]) -> str:
    results = load_results(Path(grid["results"]))
    cells = [r for r in cell_runs(grid, results) if r["name"] in results]
    failed = [r["name"] for r in cells if results[r["name"]].get("failed")]
    records = [results[r["name"]] for r in cells if not results[r["name"]].get("failed")]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    labels = list(dict.fromkeys(r["label"] for r in records))
    m, d = grid_metric(grid), sign(grid_metric(grid))
    short = "acc" if m == "accuracy" else m
    # the bar: fo-peft's final dev score on the same task and seed
    bar = {(r["task"], r["seed"]): r["curve"][-1][1] for r in records if r["label"] == grid["reference"]}
    # fo-peft's own seconds to its bar: a seed's cells run in one session, on one host, so the ratio to
    # them compares methods even where seeds ran on different hosts (whose seconds do not compare)
    ref_secs = {(r["task"], r["seed"]): reach(r["curve"], bar[(r["task"], r["seed"])], d)[1]
                for r in records if r["label"] == grid["reference"]}
    lines = [f"| task | method | seeds | test {short} (mean ± std over seeds) | best dev | "
             "steps to fo-peft's final dev | seconds to it (× fo-peft's, same seed) | s/step (median) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for label in labels:
            rs = [r for r in records if r["task"] == task and r["label"] == label]
            if not rs:
                continue
            dev, _ = mean_std([r[f"best_dev_{m}"] for r in rs])
            hits = [(reach(r["curve"], bar[(task, r["seed"])], d), ref_secs[(task, r["seed"])])
                    for r in rs if (task, r["seed"]) in bar]
            got = [(h, ref) for h, ref in hits if h is not None]
            # medians over every seed, a seed that never reached the bar counted as beyond the budget
            steps = f"{_median_reached([h and h[0] for h, _ in hits])} ({len(got)}/{len(hits)} reached)"
            secs = _median_reached([h and h[1] for h, _ in hits])
            if not hits:  # the reference has not run on these seeds yet: there is no bar
                steps, secs = "— (no reference run yet)", "—"
            elif secs != "> budget":
                secs += f" ({_median_reached([h and h[1] / ref for h, ref in hits], '.1f')}×)"
            acc = pm([r[f"test_{m}"] for r in rs])
            lines.append(f"| {task} | {label} | {len(rs)} | {acc} | {dev:.3f} | {steps} | {secs} | "
                         f"{statistics.fmean(r['median_step_seconds'] for r in rs):.2f} | "
                         f"{max(r['peak_rss_mb'] for r in rs):,.0f} |")
    columns = COLUMNS.format(ref=grid["reference"])
    if m != "accuracy":
        columns = columns.replace("test acc*", f"test {m}*").replace("accuracy", m).replace(
            "at or above", "at or above" if d > 0 else "at or below")
    lines += ["", columns, *fallen(records, grid), "", *paired(records, grid, bar)]
    if resumed := [r for r in records if r.get("segments")]:  # parked and resumed in a later session
        lines += ["", "Runs resumed from a checkpoint (their seconds mix these launches): " + "; ".join(
            f"{r['name']}: " + ", ".join(f"from step {s['from_step']} on {s['cpu']} ({s['isa']}, {s['threads']} "
                                         f"threads, commit {s['commit']})" for s in r["segments"])
            for r in resumed) + "."]
    moved = [r for r in records if r.get("base_movement") is not None]
    if moved:
        lines += ["", "How far the ZO updates moved the base by the best-dev step (mean |Δθ| / mean |θ| over the "
                  "ZO-trained weights, rebuilt from each run's log):", "", "| task | method | seed | movement |",
                  "|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['label']} | {r['seed']} | {r['base_movement']:.2e} |" for r in moved]
    lines += separations(records, grid)
    sweeps = [r for r in results.values() if r.get("sweep") and not r.get("reused")]
    lines += ["", f"Dev sweeps (seed 0; the best dev {m} picks the values the cells use, once every value of "
              "its sweep has run):", "", "| sweep | values | best dev | test | picked |", "|---|---|---|---|---|"]
    sweep_defs = grid.get("sweeps", {})
    picks = {name: best_of(name, grid, results) for name in sweep_defs}

    def grid_order(r: dict[str, Any]) -> tuple[int, ...]:  # a value added to a sweep later sorts into place
        if r["sweep"] not in sweep_defs:
            return (len(sweep_defs),)
        values = sweep_defs[r["sweep"]]["grid"]
        return (list(sweep_defs).index(r["sweep"]),
                *(values[k].index(r["chosen"][k]) if (r.get("chosen") or {}).get(k) in values[k] else len(values[k])
                  for k in values))

    sweeps.sort(key=grid_order)

    def picked(r: dict[str, Any]) -> str:
        if r["sweep"] not in sweep_defs:
            return "(not in the grid)"
        pick = picks[r["sweep"]]
        own = sweep_defs[r["sweep"]]["grid"]  # the sweep's own values (a record also keeps the tuned ones)
        return "(sweep unfinished)" if pick is None else "yes" if all(
            r["chosen"].get(k) == pick[k] for k in own) else ""

    lines += [f"| {r['sweep']} | {', '.join(f'{k}={value_tag(v)}' for k, v in r['chosen'].items())} | "
              + (f"{r[f'best_dev_{m}']:.3f} | {r[f'test_{m}']:.3f} |" if not r.get("failed")
                 else f"failed (exit {r['exit_code']}) | — |") + f" {picked(r)} |" for r in sweeps]
    if failed:
        lines += ["", f"Failed cells ({len(failed)}): {', '.join(failed)}"]
    pending = [r for r in sweep_runs(grid, results) + cell_runs(grid, results) if r["name"] not in results]
    if pending:
        groups: dict[str, int] = {}
        for r in pending:
            key = f"sweep {r['sweep']}" if r.get("sweep") else r["label"]
            groups[key] = groups.get(key, 0) + 1
        lines += ["", f"Not run yet: {len(pending)} runs ({'; '.join(f'{k}: {n}' for k, n in groups.items())})."]
    figures = Path(grid.get("figures", Path(grid["results"]).parent))
    home = Path(grid["readme"]).parent if grid.get("readme") else Path()
    lines += ["", f"Dev {m} against step and against training seconds (mean over seeds, min–max band):", ""]
    for task in tasks:
        plot_curves([r for r in records if r["task"] == task], labels, figures / f"study-{task}.png", task, m)
        lines.append(f"![{task}: dev {m} by step and by seconds]"
                     f"({os.path.relpath(figures / f'study-{task}.png', home)})")
    return "\n".join(lines) + "\n"


COLUMNS = ("Columns: *test acc* is the mean ± sample std (n − 1) over seeds of each run's test accuracy at its "
           "best-dev step; *best dev* the mean of the runs' best dev accuracies; *steps to {ref}'s final dev* the "
           "median over seeds of the first evaluated step at or above {ref}'s final dev accuracy on the same task and "
           "seed, a seed that never reached it counted as beyond the budget (\"> budget\" when that is the median), "
           "with how many reached it; *seconds to it* the median of the same runs' seconds and of their ratios to "
           "{ref}'s own seconds to the bar; *s/step* the mean over seeds of each run's median step time; *peak RSS* "
           "the largest over seeds.")


def _median_reached(values: list[float | None], fmt: str = ".0f") -> str:
    """The median with None (never reached) sorted last: "> budget" when it falls there (an even count whose
    two middle values include one)."""
    ordered = sorted(values, key=lambda v: (v is None, v or 0.0))
    n = len(ordered)
    if not n:
        return "—"
    middle = ordered[(n - 1) // 2: n // 2 + 1]
    if any(v is None for v in middle):
        return "> budget"
    return f"{statistics.fmean(middle):{fmt}}"  # type: ignore[arg-type]


def paired(records: list[dict[str, Any]], grid: dict[str, Any], bar: dict[tuple[str, int], float]) -> list[str]:
    """The paper's claim in its own terms, each seed against the same task's and seed's baselines: test
    accuracy minus each baseline's (``baselines``: labels, default the reference), and steps to the bar as a
    fraction of the reference's own steps to it ("up to 50 % fewer steps" is a fraction ≤ 0.5)."""
    baselines = grid.get("baselines", [grid["reference"]])
    by = {(r["task"], r["label"], r["seed"]): r for r in records}
    m, d = grid_metric(grid), sign(grid_metric(grid))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    labels = [label for label in dict.fromkeys(r["label"] for r in records) if label != grid["reference"]]
    ref = grid["reference"]
    margin = float(grid.get("margin", 0.02))
    lines = [f"Paired by seed: each run's test {m} minus the baselines' on the same task and seed, over the "
             f"seeds both ran: mean ± sample std [95 % t-interval of the mean], then the verdict against the "
             f"equivalence margin ±{margin:g} stated in the grid file (`margin`) before these results were read: "
             f"*equivalent* when the interval lies inside it, *above*/*below* when it excludes 0 and leaves the "
             f"margin, *inconclusive* otherwise; ↑/=/↓ count the seeds above, equal to and below. *all tasks* pools "
             f"every paired seed of the tasks with more than one seed. The bar "
             f"is {ref}'s final dev {m} on that task and seed; the last column gives each seed's steps to it "
             f"as a fraction of {ref}'s own (≤ 0.50 is the paper's \"50 % fewer steps\"), in seed order, and "
             f"their median, a seed that never reached the bar counted as beyond the budget.", "",
             "| task | method | " + " | ".join(f"test − {b}'s" for b in baselines)
             + f" | steps to the bar ÷ {ref}'s, per seed (median) |",
             "|---|---|" + "---|" * (len(baselines) + 1)]
    def cell(label: str, base: str, keys: list[tuple[str, int]]) -> str:
        diffs = [by[t, label, s][f"test_{m}"] - by[t, base, s][f"test_{m}"] for t, s in keys
                 if (t, base, s) in by]
        if base == label or not diffs:
            return "—" if base == label else "not run"
        up, down = sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs)
        p = stats.paired(diffs)
        verdict = f" {p.verdict(margin)}" if p.n > 1 else ""
        return f"{p.describe()}{verdict} ({up}↑ {len(diffs) - up - down}= {down}↓)"

    multi = [t for t in tasks if len({s for tt, _, s in by if tt == t}) > 1]
    for label in labels:
        keys = [(t, s) for t, lab, s in by if lab == label and t in multi]
        if keys:
            lines.append("| all tasks | " + label + " | " + " | ".join(cell(label, b, keys) for b in baselines)
                         + " | |")
    for task in tasks:
        for label in labels:
            seeds = sorted(s for t, lab, s in by if (t, lab) == (task, label))
            if not seeds:
                continue
            row = [task, label, *(cell(label, base, [(task, s) for s in seeds]) for base in baselines)]
            ratios = []
            for s in (s for s in seeds if (task, ref, s) in by):
                mine = reach(by[task, label, s]["curve"], bar[task, s], d)
                own = reach(by[task, ref, s]["curve"], bar[task, s], d)  # None only for a curve without evals
                ratios.append(None if mine is None or own is None else mine[0] / own[0])
            got = [r for r in ratios if r is not None]
            per_seed = " / ".join("not reached" if r is None else f"{r:.2f}" for r in ratios)
            row.append(f"{per_seed} (median {_median_reached(ratios, '.2f')})" if got else
                       f"not reached (0/{len(ratios)})" if ratios else "not run")
            lines.append("| " + " | ".join(row) + " |")
    return lines


def fallen(records: list[dict[str, Any]], grid: dict[str, Any]) -> list[str]:
    """A warning for each reference run whose last dev score is worse than its best by more than the margin:
    the bar (its final dev) and the separation test then compare with a curve that fell, not with the method."""
    ref, margin, d = grid["reference"], float(grid.get("margin", 0.02)), sign(grid_metric(grid))
    m = grid_metric(grid)
    lines = []
    for r in records:
        if r["label"] != ref or not r["curve"]:
            continue
        best = max(r["curve"], key=lambda c: d * c[1])
        final = r["curve"][-1]
        if d * (best[1] - final[1]) > margin + 1e-9:
            lines.append(f"**Warning:** {ref}, {r['task']} seed {r['seed']}: its final dev {m} ({final[1]:.3f} at step "
                         f"{final[0]:.0f}) is {abs(best[1] - final[1]):.3f} worse than its best ({best[1]:.3f} at step "
                         f"{best[0]:.0f}), beyond the margin ±{margin:g}. The bar above and the separation test "
                         "compare with that fallen curve, so they say little about the other methods.")
    return ["", *lines] if lines else []


MIN_EVALS_APART = 2  # a separation must hold over at least this many evaluations


def separation(mine: list[list[float]], ref: list[list[float]], margin: float,
               direction: float = 1.0) -> tuple[float, str] | None:
    """(step, "above" or "below"): the first evaluated step from which ``mine``'s dev score stays more than
    ``margin`` better (or worse) than ``ref``'s at every later evaluation both made, over at least
    ``MIN_EVALS_APART`` evaluations (one last evaluation alone is not a separation); None when it never does.
    "above" is better: a higher accuracy, or a lower loss (``direction`` −1)."""
    ref_at = {step: score for step, score, _ in ref}
    gaps = [(step, direction * (score - ref_at[step])) for step, score, _ in mine if step in ref_at]
    for side, word in ((1.0, "above"), (-1.0, "below")):
        start, count = None, 0
        for step, gap in gaps:  # the last run of evaluations beyond the margin on this side
            beyond = side * gap > margin + 1e-9  # a gap of exactly the margin is inside it
            start, count = ((step if start is None else start), count + 1) if beyond else (None, 0)
        if start is not None and count >= MIN_EVALS_APART:
            return start, word
    return None


def separations(records: list[dict[str, Any]], grid: dict[str, Any]) -> list[str]:
    """When each method's dev curve leaves the reference's for good (same task and seed), by the margin."""
    if not grid.get("separation"):  # asked for by the grid file (issue #27's long study)
        return []
    ref, margin, d = grid["reference"], float(grid.get("margin", 0.02)), sign(grid_metric(grid))
    by = {(r["task"], r["label"], r["seed"]): r for r in records}
    rows = []
    for (task, label, seed), r in by.items():
        if label == ref or (task, ref, seed) not in by:
            continue
        other = by[task, ref, seed]["curve"]
        found = separation(r["curve"], other, margin, d)
        ref_at = {step: score for step, score, _ in other}
        common = [(step, score) for step, score, _ in r["curve"] if step in ref_at]
        last = d * (common[-1][1] - ref_at[common[-1][0]]) if common else float("nan")
        when = f"step {found[0]:.0f}, {found[1]}" if found else "never"
        rows.append(f"| {task} | {label} | {seed} | {when} | {last:+.3f} |")
    if not rows:
        return []
    return ["", f"When each method separates from {ref} on dev (same task and seed): the first evaluated step "
            f"from which its dev {grid_metric(grid)} stays more than the margin ±{margin:g} above (or below) "
            f"{ref}'s at every later evaluation, at least {MIN_EVALS_APART} evaluations in all; *never* when no "
            "such step exists; *above* means better (for a loss, lower). The last column is the gap "
            "at the last evaluation both made (positive: better).", "",
            "| task | method | seed | separates | final dev gap |", "|---|---|---|---|---|", *rows]


def plot_curves(records: list[dict[str, Any]], labels: list[str], path: Path, task: str,
                metric: str = "accuracy") -> None:
    """Dev score against step and against training seconds: mean over seeds and a min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels:
        rs = [r for r in records if r["label"] == label]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        for ax, x in ((axes[0], 0), (axes[1], 2)):
            xs = [statistics.fmean(r["curve"][i][x] for r in rs) for i in range(n)]
            ys = [[r["curve"][i][1] for r in rs] for i in range(n)]
            line, = ax.plot(xs, [statistics.fmean(y) for y in ys], marker="o", ms=3, label=f"{label} ({len(rs)})")
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
    axes[0].set(xlabel="step", ylabel=f"dev {metric}", title=f"{task}: dev {metric} by step")
    axes[1].set(xlabel="training seconds (2 CPU cores)", ylabel=f"dev {metric}", title=f"{task}: by wall-clock")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


BEGIN, END = "<!-- study:begin (scripts/grid.py render writes this) -->", "<!-- study:end -->"


def inject(readme: Path, text: str) -> None:
    """Replace the block between the study markers of ``readme`` with ``text``."""
    doc = readme.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"[grid] {readme} has no study markers; not written", flush=True)
        return
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def stop_time(hhmm: str) -> float:
    """``HH:MM`` local time → epoch seconds: the next such time, which must be within 12 hours (a time just
    passed is refused, not taken as tomorrow's)."""
    try:
        hour, minute = (int(x) for x in hhmm.split(":"))
        now = datetime.datetime.now()
        at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    except ValueError as err:
        raise SystemExit(f"[grid] --stop-at {hhmm!r}: expected HH:MM, e.g. 22:15") from err
    at = at if at > now else at + datetime.timedelta(days=1)
    if at - now > datetime.timedelta(hours=12):
        raise SystemExit(f"[grid] --stop-at {hhmm}: that is {(at - now).total_seconds() / 3600:.1f} h from now "
                         f"({now:%H:%M} here): has it passed? give a time within 12 h")
    return at.timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "render", "list", "park"])
    parser.add_argument("grid", help="grid YAML file")
    parser.add_argument("--only", default=None, help="run only the runs whose name contains this")
    parser.add_argument("--exclude", default=None, help="skip the runs whose name contains this")
    parser.add_argument("--stop-at", default=None, metavar="HH:MM",
                        help="run: at this local time (the next one, within 12 h) stop the run in "
                             "progress (it checkpoints) and park what is unfinished; skip cells whose "
                             "session_hours no longer fit")
    parser.add_argument("--reuse", action="store_true",
                        help="a cell identical to a finished sweep run takes its record (accuracy only: the "
                             "sweep's seconds may come from a shared machine)")
    args = parser.parse_args()
    grid = yaml.safe_load(Path(args.grid).read_text())
    if args.action == "run":
        stop_at = stop_time(args.stop_at) if args.stop_at else None
        if stop_at is not None:
            print(f"[grid] will stop at {datetime.datetime.fromtimestamp(stop_at):%Y-%m-%d %H:%M} (local time, "
                  f"{time.strftime('%Z')})", flush=True)
        run_grid(grid, args.only, args.reuse, args.exclude, stop_at)
        text = render(grid)
        print(text)
        if grid.get("readme"):
            inject(Path(grid["readme"]), text)
    elif args.action == "park":
        if not grid.get("parked"):
            raise SystemExit(f"[grid] {args.grid} names no `parked` folder to copy unfinished runs into")
        for line in park(grid):
            print(f"[grid] {line}")
    elif args.action == "render":
        text = render(grid)
        print(text)
        if grid.get("readme"):
            inject(Path(grid["readme"]), text)
    else:
        check(grid)
        results = load_results(Path(grid["results"]))
        for run in sweep_runs(grid, results) + cell_runs(grid, results):
            done = "done" if run["name"] in results else "    "
            cmd = command(run["config"], Path(grid["out"]) / run["name"]) if run["config"] else "(waits for sweep)"
            print(f"{done} {run['name']}: {cmd}")


if __name__ == "__main__":
    main()
