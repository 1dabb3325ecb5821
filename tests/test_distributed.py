"""Data parallel on torch.distributed (gloo, 2 CPU processes): replicas stay bitwise identical, a run matches
a single process with the same global batch, and a killed rank stops the others cleanly and resumably."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyft import cli
from hyft.cli import main
from hyft.config import RunConfig
from hyft.distributed import Communicator, PeerLost, buckets, fingerprint
from hyft.engine.zo import canonical_name
from hyft.errors import HyftError
from hyft.rundir import read_jsonl
from hyft.training.loop import Trainer
from tests.dp_worker import CASES, METHODS, config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# float32 sums over 2 shards of 2 examples vs one batch of 4: the losses agree to rounding, and a ZO
# coefficient (L+ − L−)/2ε divides that rounding by ε
LOSS_TOL, COEF_TOL, WEIGHT_TOL = 1e-6, 1e-4, 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *args]


def start_ranks(args: list[str], out: Path, rows: int) -> list[subprocess.Popen]:
    """Two ranks of ``hyft ARGS`` started by hand as torchrun starts them; returns once ``rows`` metrics rows
    are written."""
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-m", "hyft", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                              "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < rows:
        assert time.time() < deadline and ranks[0].poll() is None, ranks[0].communicate()
        time.sleep(0.1)
    return ranks


def run_worker(worker: str, tiny_dir: str, out: Path) -> Path:
    """``tests/WORKER`` under torchrun with 2 ranks on the tiny model, writing into ``out``."""
    proc = subprocess.run(torchrun(str(Path(__file__).parent / worker), tiny_dir, str(out)), capture_output=True,
                          text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_process_runs(tiny_dir, tmp_path_factory) -> Path:
    return run_worker("dp_worker.py", tiny_dir, tmp_path_factory.mktemp("dp"))


def close(a: float | None, b: float | None, tol: float) -> bool:
    return (a is None and b is None) or abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one_and_replicas_are_bitwise_equal(method, two_process_runs, tiny_dir, tmp_path):
    rank0 = load_file(two_process_runs / f"{method}-rank0.safetensors")
    rank1 = load_file(two_process_runs / f"{method}-rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the replicas hold different weights"

    single = Trainer(config(tiny_dir, method), tmp_path / "single", progress=False)
    single.run()
    gap = {name: (rank0[name] - p.detach()).abs().max().item() for name, p in single.model.named_parameters()}
    print(f"{method}: largest |2 processes - 1 process| weight gap {max(gap.values()):.2e}")
    assert max(gap.values()) <= WEIGHT_TOL, max(gap.items(), key=lambda kv: kv[1])
    dp, one = two_process_runs / method, tmp_path / "single"
    rows, ref = read_jsonl(dp / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for r, s in zip(rows, ref, strict=True):
        assert close(r.get("loss"), s.get("loss"), LOSS_TOL), (r, s)
        assert close(r.get("zo_coef"), s.get("zo_coef"), COEF_TOL), (r, s)
        assert close(r.get("grad_norm"), s.get("grad_norm"), LOSS_TOL), (r, s)  # of the averaged gradient
        assert r.get("dev_accuracy") == s.get("dev_accuracy")
    if method != "fo-peft":  # the ZO logs: the same header, seeds, steps and rates; coefficients to rounding
        (h1, *u1), (h2, *u2) = read_jsonl(dp / "zo_log.jsonl"), read_jsonl(one / "zo_log.jsonl")
        assert h1 == h2 and len(u1) == len(u2) == 6
        for a, b in zip(u1, u2, strict=True):
            assert {k: v for k, v in a.items() if k != "coef"} == {k: v for k, v in b.items() if k != "coef"}
            assert close(a["coef"], b["coef"], COEF_TOL)
    results = json.loads((dp / "results.json").read_text())
    comm = results["communication"]
    assert comm["world"] == 2 and comm["backend"] == "gloo"
    assert len(set(comm["replica_fingerprints"])) == 1
    sent = comm["bytes_per_step"]
    n_fo = results["trainable_fo"]
    # ZO: two float64 losses per step; FO: φ's float32 gradient (plus its loss); every step: one stop flag,
    assert sent["zo"] == (16 if method != "fo-peft" else 0)
    assert sent["fo"] == (4 * n_fo + 8 if method == "fo-peft" else 4 * n_fo)
    # plus, once per run with a ZO group, the all-reduce that makes every rank agree on whether dropout is on
    # and, with the LM loss, a float64 count of the scored tokens per step
    lm = CASES[method].get("loss") == "lm"
    assert sent["control"] == round(4 + (4 / 6 if method != "fo-peft" else 0) + (8 if lm else 0), 1)
    assert results["test_accuracy"] == json.loads((one / "results.json").read_text())["test_accuracy"]


def test_a_killed_rank_stops_the_other_cleanly_and_the_run_resumes(tiny_dir, tmp_path):
    """Ranks started by hand as torchrun starts them; SIGKILL rank 1 mid-run: rank 0 exits by itself with
    a one-line message naming the lost peer, the checkpoint stays good, and torchrun --resume finishes."""
    out = tmp_path / "run"
    args = ["train", "--model", tiny_dir, "--method", "hybrid", "--task", "sst2", "--num-train", "24",
            "--num-dev", "8", "--num-test", "8", "--steps", "40", "--batch-size", "4", "--eval-every", "10",
            "--checkpoint-every", "3", "--lr-fo", "0.3", "--lr-zo", "1e-3", "--no-zero-shot", "--no-progress",
            "--out", str(out)]
    ranks = start_ranks(args, out, rows=8)
    ranks[1].send_signal(signal.SIGKILL)
    start = time.time()
    _, err = ranks[0].communicate(timeout=60)
    assert time.time() - start < 30
    assert ranks[0].returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("hyft: error: rank 0 of 2:") and "another process has died" in last, err[-2000:]
    assert "--resume" in last
    ranks[1].wait()

    proc = subprocess.run(torchrun("-m", "hyft", "train", "--resume", str(out), "--no-progress"),
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 40 and len(set(results["communication"]["replica_fingerprints"])) == 1
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(1, 41))


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tiny_dir, tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop after the same step, name the signal and exit 143; the
    run then resumes with one process (another N: the global batch is the same) and ends where an
    uninterrupted one-process run does."""
    out = tmp_path / "run"
    args = ["train", "--model", tiny_dir, "--method", "zo-full", "--task", "sst2", "--num-train", "24",
            "--num-dev", "8", "--num-test", "8", "--steps", "30", "--batch-size", "4", "--eval-every", "0",
            "--checkpoint-every", "100", "--lr-zo", "1e-3", "--eps", "1e-2", "--no-zero-shot", "--no-progress",
            "--out", str(out)]  # eps 1e-2: (L+ − L−)/2ε divides the 2-vs-1-process rounding by ε
    ranks = start_ranks(args, out, rows=4)
    ranks[1].send_signal(signal.SIGTERM)
    errs = [r.communicate(timeout=120)[1] for r in ranks]
    assert [r.returncode for r in ranks] == [143, 143], errs
    assert "SIGTERM at step" in errs[0].strip().splitlines()[-1], errs[0][-2000:]
    stopped = len(read_jsonl(out / "metrics.jsonl"))
    assert 4 <= stopped < 30

    # the resume and the uninterrupted reference run in this process (one process, the CLI's own path)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["communication"]["world"] == 1
    one = tmp_path / "one"
    assert main([*args[:-1], str(one)]) == 0
    rows, ref = read_jsonl(out / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [r["step"] for r in ref if "loss" in r] == list(range(1, 31))
    for r, s in zip(rows, ref, strict=True):
        assert close(r.get("loss"), s.get("loss"), LOSS_TOL), (r, s)
        assert close(r.get("zo_coef"), s.get("zo_coef"), COEF_TOL), (r, s)
        assert r.get("dev_accuracy") == s.get("dev_accuracy")


def test_a_short_last_batch_that_cannot_be_split_is_refused_before_training(tiny_dir, tmp_path, monkeypatch):
    """21 examples in batches of 4 leave a last batch of 1 each epoch: 2 processes refuse it at the start."""
    import hyft.training.loop as trainer_module

    class TwoRanks(Communicator):
        rank, world = 0, 2

    monkeypatch.setattr(trainer_module, "connect", lambda device, sharded=False: TwoRanks())
    cfg = RunConfig(model=tiny_dir, method="fo-peft", task="sst2", num_train=21, num_dev=8, num_test=8, steps=3,
                    batch_size=4, zero_shot=False)
    with pytest.raises(HyftError, match="last batch of each epoch has 1 of the 21"):
        Trainer(cfg, tmp_path / "run", progress=False).run()


def test_a_batch_that_does_not_split_evenly_is_refused():
    comm = Communicator()
    comm.world, comm.rank = 3, 1
    assert comm.shard(list(range(6))) == [2, 3]
    with pytest.raises(HyftError, match="divisible by 3"):
        comm.shard(list(range(8)))


def test_wrapper_prefixes_do_not_change_names():
    name = "model.layers.0.self_attn.q_proj.weight"
    for wrapped in (f"module.{name}", f"_orig_mod.{name}", f"module._orig_mod.base_model.model.{name}",
                    "module.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"):
        assert canonical_name(wrapped) == name


def test_buckets_and_fingerprints():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(2, dtype=torch.float64)]
    assert [len(b) for b in buckets(ts, limit=80)] == [2, 1, 1]
    a = [torch.randn(5, 7), torch.randn(3)]
    b = [t.clone() for t in a]
    assert fingerprint(a) == fingerprint(b)
    b[0].view(-1)[17] = torch.nextafter(b[0].view(-1)[17], torch.tensor(1e9))  # one ulp, one coordinate
    assert fingerprint(a) != fingerprint(b)


def test_a_lost_peer_exits_2_at_once_without_tearing_down_the_broken_group(monkeypatch, capsys):
    """A process group whose peer died cannot be torn down (gloo's threads may call std::terminate at the
    interpreter's exit: SIGABRT, not exit 2, one run in ~12 before): the CLI prints one line and leaves."""
    left: list[int] = []

    def leave(code: int) -> None:
        left.append(code)
        raise SystemExit(code)

    def lose(args) -> int:
        raise PeerLost("rank 0 of 2: all-reduce (zo) failed, another process has died")

    monkeypatch.setattr(cli, "cmd_tasks", lose)
    monkeypatch.setattr(cli.os, "_exit", leave)
    assert cli.main(["tasks"]) == 2 and not left  # no group of several processes: an ordinary error
    monkeypatch.setattr(cli, "_peers", lambda: 2)
    with pytest.raises(SystemExit):
        cli.main(["tasks"])
    assert left == [2] and capsys.readouterr().err.count("hyft: error: rank 0 of 2: all-reduce") == 2

    def fail(args) -> int:
        raise HyftError("a bad config value")

    monkeypatch.setattr(cli, "cmd_tasks", fail)
    assert cli.main(["tasks"]) == 2 and left == [2]  # any other error returns, even in a group
