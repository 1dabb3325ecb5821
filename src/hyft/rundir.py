"""Everything a run writes to disk, in one place, with atomic writes (temporary file, then rename)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hyft.errors import HyftError


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# Names a run's files have wherever they are written (a CLI run directory, a HybridTrainer output_dir)
ZO_LOG = "zo_log.jsonl"  # the ZO log: a header, then one line per ZO update
MASK_FILE = "zo-mask.safetensors"  # the sparse-ZO mask, beside its log
SNAPSHOTS = "snapshots"  # base snapshots, beside the log
ZO_STATE_FILE = "hyft_zo_state.pt"  # the ZO part of a HybridTrainer checkpoint folder


class RunDir:
    """A CLI run's directory: ``config.yaml``, ``metrics.jsonl``, ``zo_log.jsonl`` (+ mask, snapshots),
    ``checkpoint.pt``, ``best-*.safetensors``, ``results.json``, ``adapter/`` or ``model/``, ``probe.json``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> RunDir:
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise HyftError(f"output directory {path} exists and is not empty; pass --overwrite to replace it")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    zo_log = property(lambda self: self.path / "zo_log.jsonl")
    results = property(lambda self: self.path / "results.json")
    adapter = property(lambda self: self.path / "adapter")
    plots = property(lambda self: self.path / "plots")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    snapshots = property(lambda self: self.path / SNAPSHOTS)
    mask = property(lambda self: self.path / MASK_FILE)
    model = property(lambda self: self.path / "model")  # fo-full's trained model
    probe = property(lambda self: self.path / "probe.json")
    BEST_GLOB = "best-*.safetensors"
    SHARDED_GLOB = "checkpoint-shards-*"  # --shard fsdp: the direct weights and optimizer, one folder per save

    @staticmethod
    def sharded_name(step: int) -> str:
        return f"checkpoint-shards-{step:08d}"

    @staticmethod
    def best_name(step: int) -> str:
        """The file of the best-dev direct weights at ``step``."""
        return f"best-{step:08d}.safetensors"

    @classmethod
    def existing(cls, path: str | Path) -> RunDir:
        run = cls(Path(path))
        if not run.config.is_file():
            raise HyftError(f"{path} is not a run directory (no config.yaml); start a new run with --out")
        return run

    def portable_files(self) -> list[Path]:
        """The files a resume needs, relative to the run directory: everything but the base snapshots (the
        original weights and the ZO log rebuild them) and unfinished temporary writes. The checkpoint comes
        first: the logs only grow, so copied after it they hold every line it counts."""
        files = [f.relative_to(self.path) for f in sorted(self.path.rglob("*")) if f.is_file()
                 and SNAPSHOTS not in f.relative_to(self.path).parts[:1] and not f.name.endswith(".tmp")]
        return sorted(files, key=lambda f: f != Path("checkpoint.pt"))

    def truncate_jsonl(self, path: Path, lines: int) -> None:
        """Keep the first ``lines`` lines (rows written after the checkpoint being resumed are dropped)."""
        if path.is_file():
            kept = path.read_text().splitlines(keepends=True)[:lines]
            atomic_write_text(path, "".join(kept))

    def log_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.results, json.dumps(results, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
