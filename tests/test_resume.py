"""Exact resume: a tiny-model run killed with SIGKILL (or stopped with SIGTERM) at several points and
resumed ends with the same weights, metrics rows, ZO log and test accuracy as an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyft.cli import main
from hyft.config import RunConfig
from hyft.training.loop import config_changes

STEPS = 40


def command(model: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hyft.cli", "train", "--model", model, "--method", "hybrid", "--task", "sst2",
            "--num-train", "24", "--num-dev", "8", "--num-test", "8", "--steps", str(STEPS), "--batch-size", "4",
            "--eval-every", "7", "--checkpoint-every", "3", "--lr-fo", "0.3", "--lr-zo", "1e-3",
            "--no-zero-shot", "--no-progress", "--out", str(out), *extra]


# low-rank directions with V held 5 steps: checkpoints every 3 fall inside fold periods (updates pending)
LOWRANK = ("--zo-dist", "lowrank", "--zo-lazy", "5", "--snapshot-every", "4")


def in_process(args: list[str]) -> None:
    """``hyft ARGS`` in this process, on one thread like the killed runs (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


def resume(out: Path) -> None:
    in_process(["train", "--resume", str(out), "--no-progress"])


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def step_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def comparable(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    return {
        "metrics": [{k: v for k, v in r.items() if "seconds" not in k} for r in rows],
        "zo_log": (out / "zo_log.jsonl").read_text(),
        "adapter": {k: v.tolist() for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items()},
        "test_accuracy": results["test_accuracy"],
        "best": (results["best_step"], results["best_dev_accuracy"], results["zo_log_best_index"]),
    }


@pytest.fixture(scope="module")
def reference_run(tiny_dir, tmp_path_factory) -> Path:
    """One uninterrupted run (its directory is only read), in this process: a process start costs more than
    the run, and the resumes already show that this process computes what a fresh one does."""
    out = tmp_path_factory.mktemp("ref") / "run"
    in_process(command(tiny_dir, out)[3:])
    return out


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    return comparable(reference_run)


@pytest.fixture(scope="module")
def lowrank_reference(tiny_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref-lowrank") / "run"
    in_process(command(tiny_dir, out, *LOWRANK)[3:])
    return comparable(out)


@pytest.mark.parametrize(("kill_after", "extra"), [
    (1, ()),  # before the first checkpoint
    (26, ()),  # after checkpoints and a best dev
    (23, LOWRANK),  # mid fold period, with a snapshot that holds pending low-rank updates
])
def test_sigkill_and_resume_matches_uninterrupted_run(kill_after, extra, tiny_dir, tmp_path, request):
    reference = request.getfixturevalue("lowrank_reference" if extra else "reference")
    out = tmp_path / "run"
    proc = subprocess.Popen(command(tiny_dir, out, *extra), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while step_rows(out) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = step_rows(out)
    assert killed_at < STEPS, "the run finished before it could be killed; the test needs slower steps"
    resume(out)
    assert comparable(out) == reference


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_dir, tmp_path, reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(tiny_dir, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    while step_rows(out) < 5 and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "checkpoint saved; resume with `hyft train --resume" in err and "Traceback" not in err
    assert (out / "checkpoint.pt").is_file()
    resume(out)
    assert comparable(out) == reference


def test_resume_with_a_different_config_is_refused(reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    assert main(["train", "--resume", str(out), "--lr-fo", "0.9"]) == 2  # the CLI's own path, in this process
    err = capsys.readouterr().err
    assert "cannot resume" in err and "lr_fo: 0.3 -> 0.9" in err


def test_a_key_missing_from_an_older_checkpoints_config_counts_as_its_default():
    stored = {k: v for k, v in RunConfig().to_dict().items() if k != "max_grad_norm"}  # saved before the key
    assert config_changes(stored, RunConfig()) == ""
    assert config_changes(stored, RunConfig(max_grad_norm=1.0)) == "max_grad_norm: 0.0 -> 1.0"
