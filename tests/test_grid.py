"""scripts/grid.py's study logic: sweeps expand, cells wait for the sweeps they are tuned on and take the
best-dev values (failed runs lose), and every fixed key is checked before anything runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("grid", Path(__file__).parent.parent / "scripts" / "grid.py")
grid_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grid_module)

GRID = {
    "out": "runs/x", "results": "docs/x.jsonl", "base": {"steps": 10},
    "sweeps": {"fo": {"task": "sst2", "method": "fo-peft", "grid": {"lr_fo": [1e-3, 3e-3]}},
               "hy": {"task": "sst2", "method": "hybrid", "tuned": "fo", "grid": {"lr_zo": [1e-6, 1e-5]}}},
    "cells": {"hybrid": {"label": "hybrid", "method": "hybrid", "tuned": ["fo", "hy"], "tasks": ["cb"],
                         "seeds": [0, 1]}},
}


def test_cells_wait_for_their_sweeps_and_take_the_best_dev_values():
    g = grid_module
    assert [r["name"] for r in g.sweep_runs(GRID, {})][:2] == ["sweep-fo-lr_fo0.001", "sweep-fo-lr_fo0.003"]
    assert all(r["config"] is None for r in g.sweep_runs(GRID, {}, only="hy"))  # tuned on an unfinished sweep
    assert all(r["config"] is None for r in g.cell_runs(GRID, {}))
    results = {"sweep-fo-lr_fo0.001": {"best_dev_accuracy": 0.8}, "sweep-fo-lr_fo0.003": {"best_dev_accuracy": 0.8}}
    hy = g.sweep_runs(GRID, results, only="hy")
    assert hy[0]["config"]["lr_fo"] == 1e-3  # a tie keeps the first in grid order
    results |= {"sweep-hy-lr_zo1e-06": {"best_dev_accuracy": -1.0, "failed": True},
                "sweep-hy-lr_zo1e-05": {"best_dev_accuracy": 0.7}}
    cells = g.cell_runs(GRID, results)
    assert [c["name"] for c in cells] == ["cb-hybrid-s0", "cb-hybrid-s1"]
    assert cells[1]["config"] == {"steps": 10, "method": "hybrid", "lr_fo": 1e-3, "lr_zo": 1e-5, "task": "cb",
                                  "seed": 1}


def test_a_bad_key_stops_the_grid_before_any_run():
    bad = {**GRID, "cells": {"x": {"label": "x", "method": "hybrid", "AdamW)": None, "tasks": ["cb"]}}}
    with pytest.raises(SystemExit, match="unknown key"):
        grid_module.check(bad)
    grid_module.check(GRID)


def test_a_cell_reuses_an_identical_sweep_run_only_when_asked(tmp_path, monkeypatch):
    """--reuse: the cell takes the sweep run's record; by default it runs anew (its seconds must be its own)."""
    import json

    g = grid_module
    config = {"steps": 10, "method": "fo-peft", "task": "sst2", "seed": 0}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"name": "sweep-fo-lr_fo0.001", "config": config, "best_dev_accuracy": 0.8}) + "\n")
    cell = {"name": "sst2-fo-s0", "cell": "fo", "label": "fo", "config": config}
    launched = []

    class Interrupted:
        returncode = 143

    real_run = g.subprocess.run

    def fake_run(argv, check=False, **kwargs):  # training launches are recorded; git (provenance) runs
        if argv[0] == "git":
            return real_run(argv, check=check, **kwargs)
        launched.append(argv)
        return Interrupted()

    monkeypatch.setattr(g.subprocess, "run", fake_run)
    g.run_one(cell, tmp_path / "runs", results, reuse=True)
    assert not launched and g.load_results(results)["sst2-fo-s0"]["reused"] == "sweep-fo-lr_fo0.001"
    results.write_text(results.read_text().splitlines()[0] + "\n")
    with pytest.raises(SystemExit, match="interrupted"):
        g.run_one(cell, tmp_path / "runs", results)
    assert launched and "sst2-fo-s0" not in g.load_results(results)


def test_a_run_resumed_in_another_session_names_its_launches(tmp_path):
    import json

    g = grid_module
    grid = {"out": str(tmp_path / "runs"), "results": str(tmp_path / "r.jsonl"), "figures": str(tmp_path),
            "reference": "fo", "base": {}, "cells": {"fo": {"label": "fo", "method": "fo-peft", "tasks": ["cb"],
                                                          "seeds": [0]}}}
    host = {"cpu": "X", "isa": "avx2", "threads": 2, "commit": "abc"}
    row = {"name": "cb-fo-s0", "seed": 0, "task": "cb", "label": "fo", "test_accuracy": 0.7, "curve": [[10, 0.9, 5]],
           "best_dev_accuracy": 0.9, "median_step_seconds": 1.0, "peak_rss_mb": 1.0}
    Path(grid["results"]).write_text(json.dumps(row) + "\n")
    assert "resumed from a checkpoint" not in g.render(grid)
    other = {**row, "name": "cb-full-s0", "label": "full"}  # a cell finished before the reference ran any seed
    grid["cells"]["full"] = {"label": "full", "method": "fo-full", "tasks": ["cb"], "seeds": [0]}
    Path(grid["results"]).write_text(json.dumps(other) + "\n")
    assert "| cb | full | 1 | 0.700 | 0.900 | — (no reference run yet) | — |" in g.render(grid)
    del grid["cells"]["full"]
    Path(grid["results"]).write_text(json.dumps(row) + "\n")
    row["segments"] = [{"from_step": 0, **host}, {"from_step": 250, **host, "cpu": "Y"}]
    Path(grid["results"]).write_text(json.dumps(row) + "\n")
    assert ("cb-fo-s0: from step 0 on X (avx2, 2 threads, commit abc), from step 250 on Y (avx2, 2 threads, "
            "commit abc).") in g.render(grid)


def test_each_launch_of_a_run_is_recorded_as_a_segment(tmp_path, monkeypatch):
    """A fresh start (which --overwrite's its folder) and the resume that finishes it are both in the record."""
    import json
    import shutil

    g = grid_module
    cell = {"name": "sst2-fo-s0", "cell": "fo", "label": "fo",
            "config": {"steps": 10, "method": "fo-peft", "task": "sst2", "seed": 0}}
    results, run_dir = tmp_path / "results.jsonl", tmp_path / "runs" / "sst2-fo-s0"
    real_run = g.subprocess.run

    def fake_run(argv, check=False, **kwargs):
        if argv[0] == "git":
            return real_run(argv, check=check, **kwargs)
        if "--overwrite" in argv:  # a fresh start: hyft train empties the folder, trains 5 steps, is stopped
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            (run_dir / "checkpoint.pt").write_text("")
            return type("Done", (), {"returncode": 143})()
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 0.5, "seconds": 1.0}) + "\n")
        (run_dir / "results.json").write_text(json.dumps({"method": "fo-peft", "metric": "accuracy"}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(g.subprocess, "run", fake_run)
    monkeypatch.setattr(g, "checkpoint_step", lambda d: 5 if (d / "checkpoint.pt").is_file() else 0)
    with pytest.raises(SystemExit, match="interrupted"):
        g.run_one(cell, tmp_path / "runs", results)
    g.run_one(cell, tmp_path / "runs", results)
    record = g.load_results(results)["sst2-fo-s0"]
    assert [s["from_step"] for s in record["segments"]] == [0, 5]
    assert record["segments"][1]["cpu"] == record["provenance"]["cpu"]


def test_a_recorded_runs_step_log_is_copied_to_the_grids_logs_folder(tmp_path, monkeypatch):
    """With ``logs``, the run's whole metrics.jsonl (every step, not only the record's dev curve) lands there."""
    import json

    g = grid_module
    cell = {"name": "sst2-fo-s0", "cell": "fo", "label": "fo",
            "config": {"steps": 2, "method": "fo-peft", "task": "sst2", "seed": 0}}
    run_dir, logs = tmp_path / "runs" / "sst2-fo-s0", tmp_path / "docs" / "metrics"
    rows = [{"step": 1, "loss": 0.7, "seconds": 1.0}, {"step": 2, "loss": 0.5, "seconds": 2.0},
            {"step": 2, "dev_accuracy": 0.8}]
    real_run = g.subprocess.run

    def fake_run(argv, check=False, **kwargs):
        if argv[0] == "git":
            return real_run(argv, check=check, **kwargs)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "results.json").write_text(json.dumps({"method": "fo-peft", "metric": "accuracy"}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(g.subprocess, "run", fake_run)
    g.run_one(cell, tmp_path / "runs", tmp_path / "results.jsonl", logs=logs)
    assert (logs / "sst2-fo-s0.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
    g.run_one({**cell, "name": "sst2-fo-s1"}, tmp_path / "runs", tmp_path / "results.jsonl")
    assert not (logs / "sst2-fo-s1.jsonl").exists()  # no ``logs``: nothing copied


def test_seconds_to_the_bar_compare_within_a_seed(tmp_path):
    """Seed 1 ran on a host twice as slow: mean seconds mix the hosts, the ratio to fo-peft's (same seed,
    same host) does not; a method that misses the bar on a seed counts as not reaching it there."""
    import json

    g = grid_module
    grid = {"out": str(tmp_path / "runs"), "results": str(tmp_path / "r.jsonl"), "figures": str(tmp_path),
            "reference": "fo", "base": {},
            "cells": {"fo": {"label": "fo", "method": "fo-peft", "tasks": ["cb"], "seeds": [0, 1]},
                      "hy": {"label": "hy", "method": "hybrid", "tasks": ["cb"], "seeds": [0, 1]}}}

    def record(name, seed, label, curve):
        return {"name": name, "seed": seed, "task": "cb", "label": label, "curve": curve, "test_accuracy": 0.7,
                "best_dev_accuracy": max(a for _, a, _ in curve), "median_step_seconds": 1.0, "peak_rss_mb": 1.0}

    slow = {0: 1.0, 1: 2.0}
    rows = [record(f"cb-fo-s{s}", s, "fo", [[20, 0.6, 10 * k], [40, 0.8, 20 * k]]) for s, k in slow.items()]
    rows += [record(f"cb-hy-s{s}", s, "hy", [[20, 0.8, 60 * k], [40, 0.8, 120 * k]]) for s, k in slow.items()]

    def table():  # method -> the cells of its row, rendered from ``rows``
        Path(grid["results"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        main = g.render(grid).split("\n\n")[0]  # the first table; the paired one follows
        return {line.split(" | ")[1]: line.split(" | ") for line in main.splitlines() if line.startswith("| cb")}

    assert table()["fo"][5:7] == ["40 (2/2 reached)", "30 (1.0×)"]  # medians over seeds
    assert table()["hy"][5:7] == ["20 (2/2 reached)", "90 (3.0×)"]  # 60 and 120 s, each 3× its seed's fo-peft
    rows[-1]["curve"] = [[20, 0.5, 120], [40, 0.7, 240]]
    # the seed that misses the bar counts as beyond the budget: the median of {20, never} is beyond it too
    assert table()["hy"][5:7] == ["> budget (1/2 reached)", "> budget"]
    rows[1]["test_accuracy"] = 0.8
    assert table()["fo"][3] == "0.750 ± 0.071"  # sample std (n − 1) over the two seeds
    del rows[1]
    assert table()["fo"][2:4] == ["1", "0.700"]  # one seed has no spread to show


def test_the_paired_table_compares_each_seed_with_its_own_baselines(tmp_path):
    """Test accuracy minus each baseline's on the same task and seed, and each seed's steps to the bar as a
    fraction of the reference's: pairing seed 0 with seed 1, or one task with another, gives other numbers."""
    import json

    g = grid_module
    grid = {"out": str(tmp_path / "runs"), "results": str(tmp_path / "r.jsonl"), "figures": str(tmp_path),
            "reference": "fo", "baselines": ["fo", "full"], "base": {},
            "cells": {c: {"label": c, "method": "fo-peft", "tasks": ["cb", "copa"], "seeds": [0, 1]}
                      for c in ("fo", "full", "hy")}}
    # (task, cell, seed): (test accuracy, first step whose dev accuracy reaches fo's final 0.9; None: never)
    runs = {("cb", "fo", 0): (0.60, 40), ("cb", "fo", 1): (0.70, 20), ("cb", "hy", 0): (0.70, 20),
            ("cb", "hy", 1): (0.75, 40), ("cb", "full", 0): (0.65, 20), ("cb", "full", 1): (0.75, None),
            ("copa", "fo", 0): (0.50, 60), ("copa", "fo", 1): (0.55, 60), ("copa", "hy", 0): (0.50, 20),
            ("copa", "hy", 1): (0.50, 60)}  # no full run on copa
    rows = [{"name": f"{t}-{c}-s{s}", "seed": s, "task": t, "label": c, "test_accuracy": acc,
             "curve": [[k, 0.9 if first is not None and k >= first else 0.5, k / 2] for k in (20, 40, 60)],
             "best_dev_accuracy": 0.9, "median_step_seconds": 1.0, "peak_rss_mb": 1.0}
            for (t, c, s), (acc, first) in runs.items()]
    Path(grid["results"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = g.render(grid).split("Paired by seed")[1].split("\n\n")[1]
    table = {tuple(line.split(" | ")[:2]): line.split(" | ")[2:] for line in pairs.splitlines()
             if line.startswith("| ")}
    assert ("| cb", "fo") not in table  # the reference has no row of its own
    # +0.10 on seed 0, +0.05 on seed 1: sample std 0.035, t(0.975, 1) = 12.71, so the interval is ±0.318
    assert table["| cb", "hy"][0] == "+0.075 ± 0.035 [-0.243, +0.393] inconclusive (2↑ 0= 0↓)"
    assert table["| cb", "hy"][1].startswith("+0.025 ± 0.035 [")  # +0.05, 0
    assert table["| all tasks", "hy"][0].startswith("+0.025 ± 0.065 [")  # cb +0.10, +0.05; copa 0, −0.05
    assert table["| cb", "hy"][2].startswith("0.50 / 2.00 (median 1.25)")  # 20/40 and 40/20
    assert table["| cb", "full"][1] == "—"  # a baseline against itself
    assert table["| cb", "full"][2].startswith("0.50 / not reached (median > budget)")
    assert table["| copa", "hy"][0].startswith("-0.025 ± 0.035 [") and table["| copa", "hy"][0].endswith("(0↑ 1= 1↓)")
    assert table["| copa", "hy"][1] == "not run"
    assert table["| copa", "hy"][2].startswith("0.33 / 1.00 (median 0.67)")


def test_a_baseline_that_is_no_cells_label_fails_the_check():
    grid = {"reference": "fo", "baselines": ["fo", "ful"], "base": {},
            "cells": {c: {"label": c, "method": "fo-peft", "tasks": ["cb"], "seeds": [0]} for c in ("fo", "full")}}
    with pytest.raises(SystemExit, match="'ful' is not a cell's label"):
        grid_module.check(grid)


def test_a_loss_metric_is_minimised_in_sweeps_and_bars(tmp_path):
    """A grid whose ``metric`` is a loss (Alpaca): the sweep picks the lowest best-dev loss, and a run reaches
    fo-peft's final dev loss by going at or below it; an accuracy grid would pick the opposite."""
    import json

    g = grid_module
    grid = {"out": str(tmp_path / "runs"), "results": str(tmp_path / "r.jsonl"), "figures": str(tmp_path),
            "reference": "fo", "metric": "loss", "base": {},
            "sweeps": {"fo": {"task": "alpaca", "method": "fo-peft", "grid": {"lr_fo": [1e-3, 3e-3]}}},
            "cells": {"fo": {"label": "fo", "method": "fo-peft", "tuned": "fo", "tasks": ["alpaca"], "seeds": [0]},
                      "hy": {"label": "hy", "method": "hybrid", "tasks": ["alpaca"], "seeds": [0]}}}
    results = {"sweep-fo-lr_fo0.001": {"best_dev_loss": 2.0}, "sweep-fo-lr_fo0.003": {"best_dev_loss": 1.5}}
    assert g.best_of("fo", grid, results) == {"lr_fo": 3e-3}

    def record(name, label, curve):
        return {"name": name, "seed": 0, "task": "alpaca", "label": label, "curve": curve, "test_loss": curve[-1][1],
                "best_dev_loss": min(v for _, v, _ in curve), "median_step_seconds": 1.0, "peak_rss_mb": 1.0}

    rows = [record("alpaca-fo-s0", "fo", [[20, 2.0, 10], [40, 1.6, 20]]),
            record("alpaca-hy-s0", "hy", [[20, 1.5, 15], [40, 1.4, 30]])]
    Path(grid["results"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = g.render(grid)
    main = {line.split(" | ")[1]: line.split(" | ") for line in text.split("\n\n")[0].splitlines()
            if line.startswith("| alpaca")}
    assert main["hy"][5] == "20 (1/1 reached)" and main["fo"][5] == "40 (1/1 reached)"  # 1.5 ≤ 1.6 at step 20
    assert "test loss (mean" in text and "at or below" in text


def test_a_method_separates_from_the_reference_only_when_its_dev_curve_stays_beyond_the_margin(tmp_path):
    """The first step from which the gap stays beyond the margin to the end: a gap that closes again does
    not count, a loss separates the other way, and curves pair by step."""
    import json

    g = grid_module
    ref = [[k, 0.80, k] for k in (250, 500, 750, 1000)]
    assert g.separation([[250, 0.85, 1], [500, 0.81, 2], [750, 0.83, 3], [1000, 0.84, 4]], ref, 0.02) \
        == (750, "above")  # 250 was beyond the margin, but 500 came back inside it
    assert g.separation([[250, 0.85, 1], [500, 0.85, 2], [750, 0.85, 3], [1000, 0.81, 4]], ref, 0.02) is None
    # one last evaluation beyond the margin is not a separation; a gap of exactly the margin is inside it
    assert g.separation([[250, 0.80, 1], [500, 0.80, 2], [750, 0.80, 3], [1000, 0.90, 4]], ref, 0.02) is None
    assert g.separation([[250, 0.78, 1], [500, 0.78, 2], [750, 0.78, 3], [1000, 0.78, 4]], ref, 0.02) is None
    assert g.separation([[250, 0.70, 1], [500, 0.75, 2], [750, 0.77, 3], [1000, 0.77, 4]], ref, 0.02) \
        == (250, "below")
    assert g.separation([[500, 0.9, 1], [1000, 0.9, 2], [1250, 0.5, 3]], ref, 0.02) == (500, "above")  # 1250: no pair
    assert g.separation([[250, 1.0, 1], [500, 1.0, 2]], [[250, 1.1, 1], [500, 1.1, 2]], 0.02, direction=-1.0) \
        == (250, "above")  # a lower loss is better
    grid = {"out": str(tmp_path / "runs"), "results": str(tmp_path / "r.jsonl"), "figures": str(tmp_path),
            "reference": "fo", "margin": 0.02, "separation": True, "base": {},
            "cells": {c: {"label": c, "method": "fo-peft", "tasks": ["sst2"], "seeds": [0]} for c in ("fo", "hy")}}
    rows = [{"name": f"sst2-{c}-s0", "seed": 0, "task": "sst2", "label": c, "test_accuracy": 0.8, "curve": curve,
             "best_dev_accuracy": 0.9, "median_step_seconds": 1.0, "peak_rss_mb": 1.0}
            for c, curve in (("fo", ref), ("hy", [[k, 0.80 + k / 10_000, k] for k, *_ in ref]))]
    Path(grid["results"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "| sst2 | hy | 0 | step 250, above | +0.100 |" in g.render(grid)  # gaps 0.025, 0.05, ...: from 250
    assert "Warning" not in g.render(grid)  # the reference's curve did not fall
    rows[0]["curve"] = [[250, 0.80, 1], [500, 0.90, 2], [750, 0.85, 3], [1000, 0.87, 4]]  # 0.03 below its best
    Path(grid["results"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "fo, sst2 seed 0: its final dev accuracy (0.870 at step 1000) is 0.030 worse than its best (0.900 at " \
           "step 500)" in g.render(grid)
    rows[0]["curve"][-1][1] = 0.88  # 0.02 below: inside the margin
    Path(grid["results"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "Warning" not in g.render(grid)


def test_the_sweep_table_marks_the_pick_only_once_its_sweep_has_finished(tmp_path):
    """A sweep's best-so-far is not yet its pick: the value still to run may win (the long study's zo-lowrank
    sweep was extended when its top value won)."""
    import json

    g = grid_module
    grid = {**GRID, "out": str(tmp_path / "runs"), "results": str(tmp_path / "r.jsonl"), "figures": str(tmp_path),
            "reference": "hybrid"}

    def sweep_record(name, sweep, chosen, dev):
        return {"name": name, "sweep": sweep, "chosen": chosen, "best_dev_accuracy": dev, "test_accuracy": dev}

    rows = [sweep_record("sweep-fo-lr_fo0.001", "fo", {"lr_fo": 1e-3}, 0.7),
            sweep_record("sweep-fo-lr_fo0.003", "fo", {"lr_fo": 3e-3}, 0.8),
            sweep_record("sweep-hy-lr_zo1e-06", "hy", {"lr_fo": 3e-3, "lr_zo": 1e-6}, 0.9)]

    def picked() -> list[str]:
        Path(grid["results"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        table = g.render(grid).split("Dev sweeps")[1].split("\n\n")[1].splitlines()[2:]
        return [line.rsplit(" | ", 1)[1].removesuffix(" |") for line in table]

    assert picked() == ["", "yes", "(sweep unfinished)"]
    rows.append(sweep_record("sweep-hy-lr_zo1e-05", "hy", {"lr_fo": 3e-3, "lr_zo": 1e-5}, 0.95))
    assert picked() == ["", "yes", "", "yes"]
    # fo's grid extended: its pick may change, and so may hy's (tuned on fo), though every hy value has run
    grid["sweeps"] = {**grid["sweeps"], "fo": {**grid["sweeps"]["fo"], "grid": {"lr_fo": [1e-3, 3e-3, 1e-2]}}}
    assert picked() == ["(sweep unfinished)"] * 4
    assert g.best_of("hy", grid, g.load_results(Path(grid["results"]))) is None  # so a cell tuned on hy waits
    rows.append(sweep_record("sweep-fo-lr_fo0.01", "fo", {"lr_fo": 1e-2}, 0.1))  # finished after hy's runs
    assert picked() == ["", "yes", "", "", "yes"]  # rows in grid order: fo's three values, then hy's two


def test_a_parked_run_resumes_in_a_fresh_checkout_as_if_never_stopped(tiny_dir, tmp_path, monkeypatch):
    """A hybrid low-rank run stopped mid fold period is parked (no base snapshots), its run directory is deleted
    (a new session's checkout), and the grid's unpark plus resume end where the uninterrupted run ends."""
    import json
    import shutil

    from hyft.config import RunConfig
    from hyft.errors import HyftError
    from hyft.training.loop import Trainer
    from tests.conftest import stop_after

    g, STOP = grid_module, 13
    values = dict(model=tiny_dir, method="hybrid", fused=True, zo_dist="lowrank", zo_lazy=5, task="sst2",
                  num_train=24, num_dev=8, num_test=8, steps=14, batch_size=4, eval_every=4, checkpoint_every=5,
                  snapshot_every=3, lr_zo=1e-3, lr_fo=0.3, zero_shot=False)

    def comparable(out):
        rows = [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                for line in (out / "metrics.jsonl").read_text().splitlines()]
        results = json.loads((out / "results.json").read_text())
        return rows, (out / "zo_log.jsonl").read_text(), results["test_accuracy"], results["best_step"]

    Trainer(RunConfig(**values), tmp_path / "ref", progress=False).run()
    reference = comparable(tmp_path / "ref")
    from hyft.tools.replay import base_movement  # the grid's own, in a fresh process: the same number

    assert g.movement(tmp_path / "ref") == base_movement(tmp_path / "ref", log=lambda _: None) > 0
    assert reference[3] <= STOP  # the best-dev weights parked are the ones the test restores

    grid = {"out": str(tmp_path / "runs"), "results": str(tmp_path / "results.jsonl"),
            "parked": str(tmp_path / "parked")}
    out = tmp_path / "runs" / "cell"
    stop_after(monkeypatch, Trainer(RunConfig(**values), out, progress=False), STOP)  # V is held 5 steps: the
    # updates of steps 11-13 are pending in the accumulator
    assert list((out / "snapshots").glob("base-*"))

    broken = tmp_path / "broken" / "cell"  # a partial copy: the ZO log stops short of the checkpoint's count
    shutil.copytree(out, broken)
    log = (broken / "zo_log.jsonl").read_text().splitlines(keepends=True)
    (broken / "zo_log.jsonl").write_text("".join(log[:-2]))
    assert g.incomplete(out) is None and g.incomplete(broken).startswith("zo_log.jsonl has")
    with pytest.raises(HyftError, match="the run directory is incomplete"):  # resume refuses it too
        Trainer(RunConfig(**values), broken, progress=False, resume=True).run()

    said = g.park({**grid, "park_limit_mb": 1e-3})  # over the limit: said, and nothing copied
    assert len(said) == 1 and said[0].startswith("cell: NOT parked") and not (tmp_path / "parked" / "cell").exists()
    said = g.park(grid)
    size = sum(f.stat().st_size for f in (tmp_path / "parked" / "cell").rglob("*"))
    assert said == [f"cell: parked at step {STOP} ({size / 2**20:.1f} MB)"]
    assert not (tmp_path / "parked" / "cell" / "snapshots").exists()

    shutil.rmtree(tmp_path / "runs")  # a new checkout: runs/ is gone, parked/ was committed
    assert g.unpark(grid, {})[0].startswith(f"[grid] cell: unparked at step {STOP}")
    Trainer(RunConfig(**values), out, progress=False, resume=True).run()
    assert comparable(out) == reference

    (tmp_path / "results.jsonl").write_text(json.dumps({"name": "cell"}) + "\n")
    assert g.park(grid) == ["cell: recorded; its parked copy removed"] and not (tmp_path / "parked" / "cell").exists()
    assert g.unpark(grid, {"cell": {}}) == []


def test_stop_at_terminates_the_run_so_that_it_checkpoints(tmp_path):
    """At --stop-at, or when the grid itself gets SIGTERM, the child gets SIGTERM (hyft train's cue to
    checkpoint and exit 143), not SIGKILL, and the grid waits for it to finish doing so."""
    import subprocess
    import sys
    import time

    child = tmp_path / "child.py"
    child.write_text("import signal, sys, time\n"
                     "def stop(*_):\n"
                     "    open(sys.argv[1], 'w').write('checkpoint')\n"
                     "    sys.exit(143)\n"
                     "signal.signal(signal.SIGTERM, stop)\n"
                     "open(sys.argv[1] + '.ready', 'w').close()\n"
                     "time.sleep(60)\n")
    start = time.time()
    assert grid_module.launch([sys.executable, str(child), str(tmp_path / "a")], stop_at=start + 5) == 143
    assert (tmp_path / "a").read_text() == "checkpoint" and time.time() - start < 30
    assert grid_module.launch([sys.executable, "-c", "pass"], stop_at=time.time() + 60) == 0
    # the grid signalled long before its stop time: it stops the child first and only then returns
    grid = subprocess.Popen([sys.executable, "-c", "import importlib.util, sys, time\n"
                             f"spec = importlib.util.spec_from_file_location('g', {grid_module.__file__!r})\n"
                             "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)\n"
                             f"code = g.launch([sys.executable, {str(child)!r}, {str(tmp_path / 'b')!r}], "
                             "stop_at=time.time() + 3600)\n"
                             "print('child exit', code)\n"], stdout=subprocess.PIPE, text=True)
    ready = tmp_path / "b.ready"  # the child's handler installed (the grid's was, before the child started)
    while not ready.exists() and grid.poll() is None and time.time() - start < 120:  # a loaded machine is slow
        time.sleep(0.1)
    assert ready.exists()
    grid.send_signal(subprocess.signal.SIGTERM)
    out, _ = grid.communicate(timeout=60)
    assert out.strip() == "child exit 143" and (tmp_path / "b").read_text() == "checkpoint"


def test_stop_at_skips_a_cell_that_cannot_be_parked_when_it_would_not_finish(tmp_path, monkeypatch):
    import json
    import time

    g = grid_module
    grid = {"out": str(tmp_path / "runs"), "results": str(tmp_path / "results.jsonl"), "base": {"steps": 10},
            "cells": {"fo-full": {"method": "fo-full", "tasks": ["sst2"], "session_hours": 2},
                      "fo-peft": {"method": "fo-peft", "tasks": ["sst2"]}}}
    started: list[str] = []

    def fake_run_one(run, out, results_path, reuse=False, stop_at=None, logs=None):
        started.append(run["name"])
        with results_path.open("a") as f:
            f.write(json.dumps({"name": run["name"]}) + "\n")

    monkeypatch.setattr(g, "run_one", fake_run_one)
    g.run_grid(grid, None, stop_at=time.time() + 3600)  # 1 h left: fo-full (2 h, unparkable) waits
    assert started == ["sst2-fo-peft-s0"]
    monkeypatch.setattr(g, "checkpoint_step", lambda d: 6 if d.name == "sst2-fo-full-s0" else 0)
    g.run_grid(grid, None, stop_at=time.time() + 3600)  # 6 of its 10 steps done this session: 0.8 h left to run
    assert started == ["sst2-fo-peft-s0", "sst2-fo-full-s0"]
    assert time.time() < g.stop_time(time.strftime("%H:%M", time.localtime(time.time() + 7200))) < time.time() + 7200
    for bad, message in (("22h15", "HH:MM"), (time.strftime("%H:%M", time.localtime(time.time() - 120)), "passed")):
        with pytest.raises(SystemExit, match=message):
            g.stop_time(bad)


def test_a_run_stopped_at_stop_at_is_parked_and_the_grid_returns(tmp_path, monkeypatch):
    """run_one hands --stop-at to the launch; the interrupted run is parked and the grid returns (it renders)."""
    import time

    g = grid_module
    grid = {"out": str(tmp_path / "runs"), "results": str(tmp_path / "results.jsonl"), "base": {"steps": 10},
            "parked": str(tmp_path / "parked"), "cells": {"hy": {"method": "hybrid", "tasks": ["sst2"]}}}
    seen: list[float | None] = []

    def stopped(argv, stop_at=None):  # runs until the stop time, then exits as hyft does on SIGTERM
        seen.append(stop_at)
        time.sleep(max(0.0, stop_at - time.time()) + 0.05)
        return 143

    parked: list[str] = []
    monkeypatch.setattr(g, "launch", stopped)
    monkeypatch.setattr(g, "park", lambda grid: parked.append("parked") or ["sst2-hy-s0: parked at step 5"])
    stop_at = time.time() + 0.5
    g.run_grid(grid, None, stop_at=stop_at)
    assert seen == [stop_at] and parked == ["parked"]


def test_a_run_directory_made_with_other_settings_is_neither_recorded_nor_resumed(tmp_path):
    """After a grid file changes a cell (here: clipping added), its old run directory must not stand in for it,
    even when its config.yaml predates the key (then the key had its default)."""
    import json

    g = grid_module
    run_dir = tmp_path / "runs" / "sst2-fo-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("method: fo-peft\ntask: sst2\nseed: 0\nsteps: 10\n")  # no max_grad_norm
    (run_dir / "results.json").write_text(json.dumps({"method": "fo-peft", "metric": "accuracy"}))
    cell = {"name": "sst2-fo-s0", "cell": "fo", "label": "fo",
            "config": {"steps": 10, "method": "fo-peft", "task": "sst2", "seed": 0, "max_grad_norm": 1.0}}
    assert g.other_settings(cell, run_dir) == "max_grad_norm: 0.0 there, 1.0 in the cell"
    with pytest.raises(SystemExit, match="other settings"):
        g.run_one(cell, tmp_path / "runs", tmp_path / "results.jsonl")
    assert not (tmp_path / "results.jsonl").exists()
    same = {**cell, "config": {k: v for k, v in cell["config"].items() if k != "max_grad_norm"}}
    assert g.other_settings(same, run_dir) == ""
