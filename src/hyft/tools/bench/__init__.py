"""``hyft bench``: step time and memory of every method on one model and batch shape.

In one process, every row gets its own model copy and the rows run interleaved (row 1, row 2, ..., row 1,
...) for ``repeats`` rounds after ``warmup`` rounds, so that slow drifts of the machine hit all rows alike;
medians are reported. Peak memory is measured per row in a fresh subprocess (:mod:`hyft.tools.bench.memory`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hyft.engine import noise
from hyft.tools.bench.memory import measure
from hyft.tools.bench.report import markdown, plot_split
from hyft.tools.bench.rows import ROWS, build_row
from hyft.tools.bench.timing import CATEGORIES

__all__ = ["ROWS", "run_bench"]


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
        "cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sample(row, unobserved_first: bool) -> dict[str, float]:
    """One step timed by category (and the RNG draws it made). On a device the split's syncs slow the step,
    so one more step is timed without them (``unobserved``), before or after: the order alternates by round,
    so that neither measurement always finds the caches the other just warmed."""
    sync = row.timer.synchronising
    unobserved = row.timer.measure_unobserved(row.step) if sync and unobserved_first else None
    before = row.generated()
    sample = row.timer.measure(row.step)
    sample["drawn"] = row.generated() - before
    if sync:
        sample["unobserved"] = unobserved if unobserved is not None else row.timer.measure_unobserved(row.step)
    return sample


def _timed_rows(built: list, warmup: int, repeats: int, peaks: dict[str, Any], log=print) -> dict[str, Any]:
    """Interleaved rounds over the rows (after ``warmup``); each row's medians, totals, RNG sweeps, temporaries.
    Where the timer synchronises a device, each round also times every row unobserved (``unobserved``)."""
    samples: dict[str, list[dict[str, float]]] = {row.name: [] for row in built}
    for round_ in range(warmup + repeats):
        for row in built:
            sample = _sample(row, unobserved_first=bool(round_ % 2))
            if round_ >= warmup:
                samples[row.name].append(sample)
        log(f"round {round_ + 1}/{warmup + repeats}: " +
            ", ".join(f"{r.name} {samples[r.name][-1]['total']:.2f}s" for r in built if samples[r.name]))
    rows: dict[str, Any] = {}
    for row in built:
        s = samples[row.name]
        med = {k: statistics.median(x[k] for x in s) for k in ("total", *CATEGORIES)}
        drawn = statistics.median(x["drawn"] for x in s)
        rows[row.name] = {
            "label": row.label, "seconds": med, "all_totals": [x["total"] for x in s],
            "rng_sweeps": drawn / row.zo_numel if row.zo_numel else 0.0, "zo_numel": row.zo_numel,
            "peak_temporary": row.temporary(),
        }
        if "unobserved" in s[0]:
            rows[row.name]["unobserved"] = statistics.median(x["unobserved"] for x in s)
        if row.name in peaks:
            rows[row.name]["memory"] = peaks[row.name]
    return rows


def run_bench(model: str = "smollm2-135m", batch_size: int = 16, seq_len: int = 64, rows: list[str] | None = None,
              repeats: int = 5, warmup: int = 1, dtype: str = "float32", device: str = "auto",
              memory: bool = True, out: str | Path | None = None, log=print, sweeps: bool = False,
              launches: bool = False, autocast: str = "none") -> dict[str, Any]:
    """Time every row, measure memory, write ``bench.json``, ``bench.md`` and ``split.png`` to ``out``.

    ``sweeps``: also time one RNG sweep of the model's weight count against its limits; ``launches``: also
    count the engine's kernel launches per step for a 7B Llama on an accelerator (on meta tensors).
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    names = rows if rows is not None else list(ROWS)
    extra: dict[str, Any] = {}
    if sweeps:
        from hyft.models import load_model
        from hyft.tools.bench.sweeps import time_sweeps

        numel = sum(p.numel() for p in load_model(model, dtype, dev)[0].parameters())
        extra["sweeps"] = {"numel": numel, "seconds": time_sweeps(numel, dev, log=log)}
    if launches:
        from hyft.tools.bench.launches import llama_7b_launches

        extra["launches"] = llama_7b_launches()
    peaks = {}
    if memory:  # first, while this process is small: the subprocesses are forked from it
        for name in names:
            log(f"memory: {name}")
            peaks[name] = measure(name, model, batch_size, seq_len, dtype, str(dev), autocast=autocast)
    log(f"building {len(names)} rows on {dev} ({model}, batch {batch_size} x seq {seq_len}, {dtype}, "
        f"autocast {autocast})")
    built = [build_row(n, model, batch_size, seq_len, dtype, str(dev), autocast=autocast) for n in names]
    results: dict[str, Any] = {"rows": _timed_rows(built, warmup, repeats, peaks, log), **extra}
    results["setup"] = {"model": model, "batch_size": batch_size, "seq_len": seq_len, "dtype": dtype,
                        "autocast": autocast, "repeats": repeats, "warmup": warmup, "noise_scheme": noise.SCHEME,
                        "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv)}
    results["machine"] = machine(dev)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(results, indent=2))
        (out / "bench.md").write_text(markdown(results))
        if results["rows"]:
            plot_split(results, out / "split.png")
        log(f"wrote {out}/bench.json, bench.md, split.png")
    return results
