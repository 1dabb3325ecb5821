"""End-to-end on a tiny Llama: each method learns, runs reproduce, the ZO log replays the base bitwise,
the best-dev state is restored exactly, the adapter loads with peft, and the sampler reshuffles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hyft.cli import main
from hyft.config import RunConfig
from hyft.engine.zo import canonical_name
from hyft.methods import METHODS, Objective
from hyft.methods.params import prepare
from hyft.tasks import get_task, sample_splits
from hyft.tasks.scoring import candidate_scores, encode
from hyft.tools.replay import replay
from hyft.training.loop import Trainer
from hyft.training.sampler import EpochSampler
from tests.conftest import tiny_model


def tiny_config(model: str, **overrides) -> RunConfig:
    values = dict(model=model, task="sst2", num_train=24, num_dev=8, num_test=8, steps=6, batch_size=4,
                  eval_every=0, eval_batch_size=8, lr_fo=0.05, lr_zo=1e-3, eps=1e-3, zero_shot=False)
    values.update(overrides)
    return RunConfig(**values).validate()


# Learning rates at which each method makes progress on a fixed batch of a random tiny Llama (AdamW on
# φ: 0.5, a rate from the SGD days, diverged hybrid on an AMD EPYC host whose kernels round differently).
LEARNING_RATES = {
    "hybrid": dict(lr_fo=0.05, lr_zo=2e-3), "fo-full": dict(lr_fo=0.05), "fo-peft": dict(lr_fo=0.05),
    "zo-full": dict(lr_zo=2e-3), "zo-peft": dict(lr_zo=0.05, eps=1e-2),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_lowers_the_training_loss(method, tokenizer):
    examples = sample_splits(get_task("sst2"), seed=0, num_train=8, num_dev=0, num_test=1).train
    config = RunConfig(method=method, **LEARNING_RATES[method]).validate()
    model, groups = prepare(tiny_model("llama", len(tokenizer)), config)
    objective = Objective(model, tokenizer, config)
    batch = objective.encode(examples)
    with torch.no_grad():
        before = objective(batch).item()
    step = METHODS[method].rule(model, groups, objective, config, total=40)
    for i in range(40):
        assert not step.step(examples, i).skipped
    with torch.no_grad():
        after = objective(batch).item()
    assert after < before - 0.02, (before, after)


@pytest.mark.parametrize("mode", ["reshuffle", "once", "none"])
def test_sampler_visits_each_example_once_per_epoch(mode):
    sampler = EpochSampler(10, 3, mode, seed=1)
    epochs = []
    for _ in range(3):
        seen = []
        for _ in range(sampler.steps_per_epoch):
            seen += sampler.next_batch()
        epochs.append(seen)
        assert sorted(seen) == list(range(10))
    if mode == "reshuffle":
        assert epochs[0] != epochs[1] != epochs[2]
    elif mode == "once":
        assert epochs[0] == epochs[1] == epochs[2] != list(range(10))
    else:
        assert epochs[0] == list(range(10))


def test_sampler_state_round_trip():
    a = EpochSampler(10, 4, "reshuffle", seed=2)
    for _ in range(4):
        a.next_batch()
    b = EpochSampler(10, 4, "reshuffle", seed=99)
    b.load_state_dict(a.state_dict())
    assert [a.next_batch() for _ in range(6)] == [b.next_batch() for _ in range(6)]


def _metric_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_same_command_twice_gives_identical_metrics(tiny_dir, tmp_path):
    config = tiny_config(tiny_dir, method="hybrid", eval_every=3)
    first = Trainer(config, tmp_path / "a", progress=False).run()
    second = Trainer(config, tmp_path / "b", progress=False).run()
    assert _metric_rows(tmp_path / "a") == _metric_rows(tmp_path / "b")
    assert first["test_accuracy"] == second["test_accuracy"]
    assert (tmp_path / "a" / "zo_log.jsonl").read_text() == (tmp_path / "b" / "zo_log.jsonl").read_text()


@pytest.mark.parametrize(("method", "zo"), [("hybrid", {}), ("zo-full", {}),
                                            ("hybrid", dict(zo_dist="lowrank", zo_lazy=4)),  # folded at 4, 2 pending
                                            ("zo-full", dict(zo_dist="lowrank", zo_lazy=4, fused=False))])
def test_replay_rebuilds_the_final_base_bitwise(method, zo, tiny_dir, tmp_path):
    trainer = Trainer(tiny_config(tiny_dir, method=method, **zo), tmp_path / "run", progress=False)
    trainer.run()  # eval only at the end: the best state is the final state
    rebuilt = replay(tiny_dir, tmp_path / "run" / "zo_log.jsonl", out=tmp_path / "replayed")
    trained = {canonical_name(n): p for n, p in trainer.model.named_parameters() if "lora_" not in n}
    original = dict(AutoModelForCausalLM.from_pretrained(tiny_dir).named_parameters())
    changed = 0
    for name, p in rebuilt.named_parameters():
        assert torch.equal(p, trained[name]), name
        changed += int(not torch.equal(p, original[name]))
    assert changed == len(original)  # every base tensor moved: the log really carries the fine-tuning
    assert (tmp_path / "replayed" / "config.json").is_file()
    log_bytes = (tmp_path / "run" / "zo_log.jsonl").stat().st_size
    assert log_bytes < 4096  # 6 updates: the whole change to the base model is a few hundred bytes


def test_base_movement_is_the_relative_l1_change_of_the_zo_weights(tiny_dir, tmp_path):
    from hyft.tools.replay import base_movement

    trainer = Trainer(tiny_config(tiny_dir, method="zo-full"), tmp_path / "run", progress=False)
    trainer.run()
    original = dict(AutoModelForCausalLM.from_pretrained(tiny_dir).named_parameters())
    trained = dict(trainer.model.named_parameters())
    moved = sum(float((trained[n] - p).abs().sum()) for n, p in original.items() if n in trained)
    total = sum(float(p.abs().sum()) for n, p in original.items() if n in trained)
    assert base_movement(tmp_path / "run", log=lambda _: None) == pytest.approx(moved / total, rel=1e-5)
    assert moved > 0


def test_best_dev_state_is_restored_exactly(tiny_dir, tmp_path):
    config = tiny_config(tiny_dir, method="hybrid", steps=8, eval_every=2, lr_zo=5e-3, lr_fo=0.5)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    results = trainer.run()
    index = results["zo_log_best_index"]
    assert index == results["best_step"]  # one ZO update per step
    rebuilt = replay(tiny_dir, tmp_path / "run" / "zo_log.jsonl", upto=index)
    trained = {canonical_name(n): p for n, p in trainer.model.named_parameters() if "lora_" not in n}
    for name, p in rebuilt.named_parameters():
        assert torch.equal(p, trained[name]), name


def test_adapter_round_trip_with_peft(tiny_dir, tmp_path):
    from peft import PeftModel

    trainer = Trainer(tiny_config(tiny_dir, method="hybrid"), tmp_path / "run", progress=False)
    trainer.run()
    base = replay(tiny_dir, tmp_path / "run" / "zo_log.jsonl")
    loaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter")
    examples = sample_splits(get_task("sst2"), 0, 24, 8, 8).test
    batch = encode(trainer.tokenizer, examples)
    with torch.no_grad():
        expected = candidate_scores(trainer.model.eval(), batch)
        got = candidate_scores(loaded.eval(), batch)
    assert torch.equal(expected, got)
    assert any(not torch.all(p == 0) for n, p in loaded.named_parameters() if "lora_B" in n)


def test_run_directory_contents_and_rerun_from_config(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", tiny_dir, "--method", "fo-peft", "--num-train", "16", "--num-dev", "8",
            "--num-test", "8", "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--out", str(out),
            "--no-progress", "--lr-fo", "0.1"]
    assert main(args) == 0
    assert "fine-tuned test accuracy" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    for key in ("method", "task", "model", "steps", "seed", "test_accuracy", "best_dev_accuracy",
                "zero_shot_test_accuracy", "train_seconds", "peak_rss_mb"):
        assert key in results
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "dev_accuracy.png", "grad_norm.png"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev_accuracy" in r] == [2, 4]
    assert all({"loss", "lr_fo", "lr_zo", "zo_coef", "seconds"} <= set(r) for r in rows if "loss" in r)
    # the resolved config reruns the same job
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    assert _metric_rows(out) == _metric_rows(tmp_path / "again")
    assert main(["plot", str(out), str(tmp_path / "again"), "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "sgd-magic"], "method must be one of"),
        (["--lr-zo", "-1"], "lr_zo must be >= 0"),
        (["--eps", "0"], "eps must be > 0"),
        (["--batch-size", "0"], "batch_size must be > 0"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--peft", "nosuch"], "unknown peft method 'nosuch'"),
        (["--peft-config", "/nonexistent.yaml"], "/nonexistent.yaml"),
        (["--peft-config", "{bad_r}"], "r must be int, got 'eight'"),
        (["--peft-config", "{bad_dropout}"], "lora_dropout must be float, got 'lots'"),
    ],
)
def test_bad_train_flags_exit_2_with_one_line(tiny_dir, tmp_path, capsys, args, message, monkeypatch):
    """Refused before any model work: a model that cannot be loaded proves no load was tried."""
    (tmp_path / "r.yaml").write_text('r: "eight"\n')
    (tmp_path / "d.yaml").write_text('lora_dropout: lots\n')
    args = [a.format(bad_r=tmp_path / "r.yaml", bad_dropout=tmp_path / "d.yaml") for a in args]

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr("hyft.training.loop.load_model", no_load)
    code = main(["train", "--model", tiny_dir, "--out", str(tmp_path / "r"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_probe_flags_exit_2_with_one_line(tiny_dir, capsys):
    assert main(["probe", "--model", tiny_dir, "--batches", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batches and --directions must be >= 1" in err and "Traceback" not in err


def test_existing_output_directory_needs_overwrite(tiny_dir, tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("x")
    assert main(["train", "--model", tiny_dir, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "r" / "keep.txt").is_file()


def test_diverging_run_stops_with_a_clear_error(tiny_dir, tmp_path):
    from hyft.errors import HyftError

    config = tiny_config(tiny_dir, method="fo-peft", lr_fo=1e30, steps=12, max_bad_steps=3, checkpoint_every=1)
    with pytest.raises(HyftError, match="training diverged: 3 consecutive"):
        Trainer(config, tmp_path / "run", progress=False).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert len(skipped) == 3 and rows[-1]["skipped"]
    # a skipped step stepped no φ: no gradient norm, where a stepped one has it
    assert all((r["grad_norm"] is None) == r["skipped"] for r in rows if "loss" in r)
    # the last good checkpoint is kept: none is written during the streak of skipped steps
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["state"].step == skipped[0] - 1


def adamw_grad_norms(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The norm of the gradient each AdamW step is given, appended as the steps run."""
    seen: list[float] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


@pytest.mark.parametrize("method", ["fo-peft", "hybrid"])
def test_max_grad_norm_clips_the_gradient_the_fo_optimizer_steps_with(method, tiny_dir, tmp_path, monkeypatch):
    """Off by default (the runs so far did not clip); when set, AdamW sees a gradient of at most that norm."""
    seen = adamw_grad_norms(monkeypatch)
    Trainer(tiny_config(tiny_dir, method=method, steps=2, max_grad_norm=1e-3), tmp_path / "a", progress=False).run()
    clipped, seen[:] = list(seen), []
    Trainer(tiny_config(tiny_dir, method=method, steps=2), tmp_path / "b", progress=False).run()
    assert len(clipped) == len(seen) == 2
    assert max(clipped) <= 1e-3 * (1 + 1e-5) < min(seen)  # the unclipped gradients are larger: the clip acted
    assert RunConfig().max_grad_norm == 0  # off unless asked: the runs before it did not clip


@pytest.mark.parametrize("method", ["fo-peft", "hybrid", "zo-full"])
def test_logged_grad_norm_is_the_fo_gradients_norm_before_clipping(method, tiny_dir, tmp_path, monkeypatch):
    """Each step's row carries the norm of the gradient the FO optimizer is given (before any clip), the
    signal that precedes an FO blow-up; a method without an FO group logs none."""
    seen = adamw_grad_norms(monkeypatch)
    Trainer(tiny_config(tiny_dir, method=method, steps=3), tmp_path / "a", progress=False).run()
    logged = [r["grad_norm"] for r in _metric_rows(tmp_path / "a") if "loss" in r]
    if method == "zo-full":
        assert logged == [None] * 3 and seen == []
        return
    assert logged == pytest.approx(seen, rel=1e-5) and len(seen) == 3
    clipped = tmp_path / "b"  # with a clip the row keeps the norm before it: step 1 is the same gradient
    Trainer(tiny_config(tiny_dir, method=method, steps=1, max_grad_norm=1e-3), clipped, progress=False).run()
    assert [r["grad_norm"] for r in _metric_rows(clipped) if "loss" in r] == pytest.approx(seen[:1], rel=1e-5)
    quiet = tmp_path / "c"  # --no-log-grad-norm: no norm in the rows, the same training
    Trainer(tiny_config(tiny_dir, method=method, steps=3, log_grad_norm=False), quiet, progress=False).run()
    assert [r["grad_norm"] for r in _metric_rows(quiet) if "loss" in r] == [None] * 3
    assert [r["loss"] for r in _metric_rows(quiet) if "loss" in r] == \
        [r["loss"] for r in _metric_rows(tmp_path / "a") if "loss" in r]
