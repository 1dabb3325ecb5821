"""Training curves: loss and dev accuracy against step, for one run or several side by side."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from hyft.rundir import RunDir, read_jsonl


def _curves(run: Path) -> tuple[list, list, list, list]:
    rows = read_jsonl(RunDir(run).metrics)
    steps = [r for r in rows if "loss" in r and r["loss"] is not None]
    evals = [r for r in rows if "dev_accuracy" in r]
    return ([r["step"] for r in steps], [r["loss"] for r in steps],
            [r["step"] for r in evals], [r["dev_accuracy"] for r in evals])


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
    """One figure: training loss (moving average of 10 steps) and dev accuracy for each run."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        steps, losses, eval_steps, accs = _curves(Path(run))
        label = _label(Path(run))
        ax_loss.plot(steps, _smooth(losses), label=label)
        ax_acc.plot(eval_steps, accs, marker="o", label=label)
    ax_loss.set(xlabel="step", ylabel="training loss (10-step mean)", title="loss")
    ax_acc.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run: Path) -> list[Path]:
    """``plots/loss.png`` and ``plots/dev_accuracy.png`` for one run."""
    steps, losses, eval_steps, accs = _curves(run)
    outputs = []
    for name, xs, ys, ylabel in (("loss", steps, losses, "training loss"),
                                 ("dev_accuracy", eval_steps, accs, "dev accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, marker="o" if name == "dev_accuracy" else None, alpha=0.5 if name == "loss" else 1)
        if name == "loss":
            ax.plot(xs, _smooth(ys), label="10-step mean")
            ax.legend()
        ax.set(xlabel="step", ylabel=ylabel, title=_label(run))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = run / "plots" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        outputs.append(path)
    return outputs
