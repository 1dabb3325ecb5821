"""FSDP2 sharding (``--shard fsdp``, 2 gloo processes on CPU): each rank draws exactly its rows' slice of z,
a sharded run matches one unsharded process with the same global batch, and a sharded checkpoint resumes
after a rank is killed, on 2 processes or on 1."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyft.cli import main
from hyft.config import RunConfig
from hyft.errors import HyftError
from hyft.rundir import read_jsonl
from hyft.training.loop import Trainer
from tests.fsdp_worker import CASES, config
from tests.test_distributed import ENV, run_worker, start_ranks, torchrun
from tests.test_resume import in_process

REL = 1e-6  # losses: 2 shards' mean against one batch's, in float32
# a coefficient (L+ − L−)/2ε carries each loss's float32 rounding (a few ulps of L) divided by 2ε; the
# rounding differs even between ranks that see bitwise-equal weights (MKL's sums depend on the buffers'
# alignment), so the comparison is to this tolerance, not bitwise
ULPS = 8


def close(a: float | None, b: float | None, tol: float = REL) -> bool:
    return (a is None and b is None) or abs(a - b) <= tol * max(1.0, abs(b))




@pytest.fixture(scope="module")
def sharded_runs(tiny_dir, tmp_path_factory) -> Path:
    return run_worker("fsdp_worker.py", tiny_dir, tmp_path_factory.mktemp("fsdp"))


def test_each_rank_draws_exactly_its_rows_of_the_unsharded_z(sharded_runs):
    ranks = [json.loads((sharded_runs / f"z-rank{r}.json").read_text()) for r in range(2)]
    for rows0, rows1 in zip(*ranks, strict=True):
        assert rows0["equal"] and rows1["equal"], (rows0, rows1)
        assert rows0["start"] == 0 and rows1["start"] == rows0["numel"]  # rank 1 starts where rank 0 ends
    assert sum(r["start"] > 0 for r in ranks[1]) == len(ranks[1])  # every weight is split: offsets are tested


def test_a_sharded_engine_state_gathers_whole_and_loads_each_ranks_rows(sharded_runs):
    """bf16 residuals kept per shard (rows; a mask's values) gather whole and in order; whole tensors load
    into each rank's rows; for the dense, sparse and low-rank engines."""
    for rank in range(2):
        checked = json.loads((sharded_runs / f"state-rank{rank}.json").read_text())
        assert set(checked) == {"dense", "mask", "lowrank"}
        for kind, c in checked.items():
            assert c["residuals"] > 0 and c["gathered"] and c["weights"] and c["loaded"] and c["zeroed"] \
                and c["restored"], (kind, c)


@pytest.mark.parametrize("method", [case for case in CASES if case != "fo-full"])
def test_a_sharded_run_matches_one_unsharded_process(method, sharded_runs, tiny_dir, tmp_path):
    one = tmp_path / "one"
    Trainer(config(tiny_dir, method, shard_mode="none"), one, progress=False).run()
    two = sharded_runs / method
    rows, ref = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    eps = config(tiny_dir, method).eps
    # bf16 forwards round each activation to 8 bits: 2 shards against 1 batch differ by a few bf16 ulps of L
    rel, ulp = (REL, 2**-24) if not method.endswith("bf16") else (2**-7, 2**-8)
    for r, s in zip(rows, ref, strict=True):
        assert close(r.get("loss"), s.get("loss"), rel), (r, s)
        if "loss" in r:
            assert close(r["zo_coef"], s["zo_coef"], rel + ULPS * ulp * abs(s["loss"]) / (2 * eps)), (r, s)
            # φ's gradient norm, gathered over the shards: it carries the base's drift (≤ 1e-6 after 4 updates)
            assert close(r["grad_norm"], s["grad_norm"], 1e-4 if not method.endswith("bf16") else 1e-2), (r, s)
    (h2, *u2), (h1, *u1) = read_jsonl(two / "zo_log.jsonl"), read_jsonl(one / "zo_log.jsonl")
    assert h1 == h2 and [u["seed"] for u in u1] == [u["seed"] for u in u2] and len(u1) == 5
    # the gathered snapshot after 4 updates: the whole base as one process has it, to the coefficients' rounding
    a, b = load_file(two / "snapshots" / "base-00000004.safetensors"), load_file(one / "snapshots" /
                                                                                 "base-00000004.safetensors")
    gap = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"{method}: largest |sharded - one process| base weight after 4 updates {gap:.2e}")
    # bf16: at most one ulp of a weight near 1 (2⁻⁷), where a coefficient differing in its last digits flips a rounding
    assert a.keys() == b.keys() and gap < (1e-6 if not method.endswith("bf16") else 1e-2)
    results = json.loads((two / "results.json").read_text())
    sent = results["communication"]["bytes_per_step"]
    assert sent["zo"] == 16 and sent["fo"] == 0 and sent["shard"] > 0  # ZO's own traffic: two float64 losses
    mine = json.loads((one / "results.json").read_text())
    assert results["zero_shot_test_accuracy"] == mine["zero_shot_test_accuracy"]  # None when not evaluated
    if method.startswith("hybrid"):
        adapter = load_file(two / "adapter" / "adapter_model.safetensors")  # gathered, loads in plain peft
        mine = load_file(one / "adapter" / "adapter_model.safetensors")
        # float32: 2 shards' gradient against 1 batch's, over 5 SGD steps (at a perturbed point when fused)
        tol = 1e-5 if not method.endswith("bf16") else 1e-2
        assert adapter.keys() == mine.keys() and all((adapter[k].float() - mine[k].float()).abs().max() < tol
                                                     for k in adapter)


def test_a_sharded_fo_full_logs_the_whole_models_gradient_norm(sharded_runs, tiny_dir, tmp_path):
    """fo-full shards every weight, so each rank holds a slice of the gradient: the logged norm is the whole
    gradient's (gathered), as one process computes it, not a rank's part."""
    Trainer(config(tiny_dir, "fo-full", shard_mode="none"), tmp_path / "one", progress=False).run()
    rows, ref = read_jsonl(sharded_runs / "fo-full" / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    norms = [(r["grad_norm"], s["grad_norm"]) for r, s in zip(rows, ref, strict=True) if "loss" in r]
    # step 1 only: both start from the same weights; after it, AdamW's first update (≈ lr·sign(g)) turns the
    # shards' other summation order in near-zero gradient entries into different weights
    assert len(norms) == 5 and close(*norms[0], 1e-6), norms


@pytest.mark.parametrize("method", ["hybrid", "fo-full"])
def test_hyft_export_of_a_sharded_run_loads_in_plain_transformers_and_peft(method, sharded_runs, tmp_path):
    """fo-full: the model rank 0 gathered and saved; hybrid: the base replayed from the log plus the gathered
    adapter, loaded by ``PeftModel``. Either scores the test split as the sharded run reported."""
    run = sharded_runs / method
    assert main(["export", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / ("adapter_config.json" if method == "hybrid" else "config.json")).is_file()
    assert main(["eval", "--model", str(tmp_path / "exp"), "--task", "sst2", "--num-test", "8",
                 "--json", str(tmp_path / "e.json")]) == 0
    reported = json.loads((run / "results.json").read_text())["test_accuracy"]
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == reported


def test_a_killed_rank_resumes_sharded_on_two_processes_and_on_one(tiny_dir, tmp_path):
    """SIGKILL rank 1 mid-run; the sharded checkpoint (AdamW state included) resumes on 2 processes and, from
    a copy, on 1; both end where an uninterrupted run ends (to float32 rounding: shards sum in another order)."""
    args = ["train", "--model", tiny_dir, "--method", "hybrid", "--task", "sst2", "--num-train", "24", "--num-dev",
            "8", "--num-test", "8", "--steps", "10", "--batch-size", "4", "--eval-every", "5", "--checkpoint-every",
            "3", "--lr-fo", "1e-2", "--lr-zo", "1e-3", "--eps", "0.1", "--zo-dist", "gaussian", "--no-zero-shot",
            "--no-progress", "--shard", "fsdp"]
    ref = tmp_path / "ref"
    Trainer(RunConfig(model=tiny_dir, method="hybrid", task="sst2", num_train=24, num_dev=8, num_test=8, steps=10,
                      batch_size=4, eval_every=5, checkpoint_every=3, lr_fo=1e-2, lr_zo=1e-3, eps=0.1,
                      zo_dist="gaussian", zero_shot=False, shard="fsdp"), ref, progress=False).run()
    out = tmp_path / "run"
    ranks = start_ranks([*args, "--out", str(out)], out, rows=5)
    ranks[1].send_signal(signal.SIGKILL)
    _, err = ranks[0].communicate(timeout=60)
    ranks[1].wait()
    assert ranks[0].returncode == 2 and not (out / "results.json").exists(), err[-3000:]
    assert any(out.glob("checkpoint-shards-*")), "no sharded checkpoint was written"
    shutil.copytree(out, tmp_path / "one")
    # the 2-process resume runs under torchrun while this process resumes the copy as one process
    two = subprocess.Popen(torchrun("-m", "hyft", "train", "--resume", str(out), "--no-progress"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        in_process(["train", "--resume", str(tmp_path / "one"), "--no-progress"])  # one thread, like the ranks
        _, err = two.communicate(timeout=600)
    finally:
        two.kill()
        two.wait()
    assert two.returncode == 0, err[-3000:]
    for where in (out, tmp_path / "one"):
        rows, expected = read_jsonl(where / "metrics.jsonl"), read_jsonl(ref / "metrics.jsonl")
        assert [r["step"] for r in rows] == [r["step"] for r in expected]
        for r, s in zip(rows, expected, strict=True):
            assert abs(r.get("loss", 0) - s.get("loss", 0)) <= 1e-5, (where.name, r, s)
        adapter = load_file(where / "adapter" / "adapter_model.safetensors")
        mine = load_file(ref / "adapter" / "adapter_model.safetensors")
        assert all((adapter[k] - mine[k]).abs().max() < 1e-5 for k in mine), where.name


def test_sharding_refuses_what_it_does_not_support_in_one_line(tiny_dir):
    for bad in ({"auto_lr": True}, {"shard": "zero3"}):
        with pytest.raises(HyftError, match="shard"):
            RunConfig(model=tiny_dir, **{"shard": "fsdp", **bad}).validate()
    assert torch.distributed.is_available()
