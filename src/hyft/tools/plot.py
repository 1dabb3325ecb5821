"""Training curves: loss, the dev metric (accuracy, F1 or loss: the task's headline) and the FO gradient's
norm against step, for one run or several side by side."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from hyft.rundir import RunDir, read_jsonl


def _dev_key(row: dict) -> str:
    """The headline dev metric of an evaluation row: the first ``dev_`` key (the task's first metric)."""
    return next(k for k in row if k.startswith("dev_"))


def _curves(run: Path) -> tuple[list, list, list, list, str]:
    rows = read_jsonl(RunDir(run).metrics)
    steps = [r for r in rows if "loss" in r and r["loss"] is not None]
    evals = [r for r in rows if any(k.startswith("dev_") for k in r)]
    key = _dev_key(evals[0]) if evals else "dev_accuracy"
    return ([r["step"] for r in steps], [r["loss"] for r in steps],
            [r["step"] for r in evals], [r[key] for r in evals], key)


def _grad_norms(run: Path) -> tuple[list, list]:
    rows = [r for r in read_jsonl(RunDir(run).metrics) if r.get("grad_norm") is not None]
    return [r["step"] for r in rows], [r["grad_norm"] for r in rows]


def _label(run: Path) -> str:
    results = RunDir(run).results
    if results.is_file():
        r = json.loads(results.read_text())
        return f"{r['method']} ({r['task']}, seed {r['seed']})"
    return run.name


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, acc = [], []
    for v in values:
        acc = [*acc[-(window - 1):], v]
        out.append(sum(acc) / len(acc))
    return out


def plot_runs(runs: list[Path], out: Path) -> Path:
    """One figure: training loss (moving average of 10 steps) and the dev metric for each run."""
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(11, 4))
    keys: list[str] = []  # the dev metric of each run that has evaluations, in order, once each
    for run in runs:
        steps, losses, eval_steps, values, key = _curves(Path(run))
        label = _label(Path(run))
        ax_loss.plot(steps, _smooth(losses), label=label)
        ax_dev.plot(eval_steps, values, marker="o", label=label)
        if eval_steps and key not in keys:
            keys.append(key)
    name = " / ".join(k.replace("_", " ") for k in keys) or "dev accuracy"
    ax_loss.set(xlabel="step", ylabel="training loss (10-step mean)", title="loss")
    ax_dev.set(xlabel="step", ylabel=name, title=name)
    for ax in (ax_loss, ax_dev):
        ax.grid(alpha=0.3)
    ax_dev.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run: Path) -> list[Path]:
    """``plots/loss.png``, ``plots/dev_<metric>.png`` (e.g. dev_accuracy, dev_f1) and, with an FO group,
    ``plots/grad_norm.png`` for one run."""
    steps, losses, eval_steps, values, key = _curves(run)
    norm_steps, norms = _grad_norms(run)
    panels = [("loss", steps, losses, "training loss"), (key, eval_steps, values, key.replace("_", " "))]
    if norms:
        panels.append(("grad_norm", norm_steps, norms, "FO gradient norm (before any clip)"))
    outputs = []
    for name, xs, ys, ylabel in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, marker="o" if name == key else None, alpha=0.5 if name != key else 1)
        if name != key:
            ax.plot(xs, _smooth(ys), label="10-step mean")
            ax.legend()
        if name == "grad_norm":
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel=ylabel, title=_label(run))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = run / "plots" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        outputs.append(path)
    return outputs
