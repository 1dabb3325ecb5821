"""Metrics for the tools the ecosystem reads: every row of ``metrics.jsonl`` also goes to TensorBoard event
files or a Weights & Biases run, through those libraries (optional installs: ``pip install tensorboard``
or ``wandb``). Adding a destination is one class here and one line in REPORTERS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hyft.errors import HyftError


class Reporter:
    """Receives each metrics row (``step`` plus numbers); the default sends nowhere."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


class TensorBoard(Reporter):
    """Event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN``): scalars by metric name and step."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise HyftError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from err
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, row: dict[str, Any]) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandB(Reporter):
    """A Weights & Biases run named after the run directory, resumed with it (``WANDB_MODE=offline`` works)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError as err:
            raise HyftError("--report-to wandb needs the wandb package: pip install wandb") from err
        self.run = wandb.init(project="hyft", name=run_dir.name, dir=str(run_dir), config=config,
                              id=f"hyft-{abs(hash(str(run_dir.resolve()))) % 10**12}", resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_numbers(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


REPORTERS: dict[str, type[Reporter] | None] = {"none": None, "tensorboard": TensorBoard, "wandb": WandB}


def reporter(kind: str, run_dir: Path, config: dict[str, Any]) -> Reporter:
    if kind not in REPORTERS:
        raise HyftError(f"unknown --report-to {kind!r}; choose {', '.join(REPORTERS)}")
    cls = REPORTERS[kind]
    return Reporter() if cls is None else cls(run_dir, config)
