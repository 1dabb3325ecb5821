"""Methods declare what they train: a method registered here, in the test file only, trains, checkpoints,
resumes and saves through the trainer without any other module knowing its name."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from hyft.config import RunConfig
from hyft.errors import HyftError
from hyft.methods import METHODS, MethodSpec
from hyft.methods.base import Method, StepStats, finite
from hyft.methods.hybrid import Hybrid
from hyft.training.loop import Interrupted, Trainer


class SignDescent(Method):
    """A toy rule: signSGD on the FO group, φ ← φ − η·sign(∇φ L)."""

    name = "sign"

    def update(self, batch, step: int) -> StepStats:
        loss = self.loss_with_grad(batch).item()
        if not finite(loss):
            self.discard_grads()
            return StepStats(loss=loss, skipped=True)
        with torch.no_grad():
            for _, p in self.groups.fo:
                p.add_(p.grad.sign(), alpha=-self.config.lr_fo)
        self.discard_grads()
        return StepStats(loss=loss, lr_fo=self.config.lr_fo)


def run_config(tiny_dir: str, method: str, steps: int = 6) -> RunConfig:
    return RunConfig(model=tiny_dir, method=method, task="sst2", num_train=16, num_dev=8, num_test=8, steps=steps,
                     batch_size=4, eval_every=3, checkpoint_every=3, lr_fo=1e-3, lr_zo=1e-3, zero_shot=False)


@pytest.mark.parametrize("name,spec", [("sign-peft", MethodSpec(SignDescent, fo="peft")),
                                       ("reverse-hybrid", MethodSpec(Hybrid, zo="peft", fo="base"))])
def test_a_method_registered_in_a_test_file_trains_and_resumes(name, spec, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, name, spec)
    reference = Trainer(run_config(tiny_dir, name), tmp_path / "ref", progress=False).run()
    assert reference["method"] == name and reference["trainable_fo"] > 0
    assert (tmp_path / "ref" / ("adapter" if spec.uses_peft else "model")).is_dir()
    assert ((tmp_path / "ref" / "zo_log.jsonl").is_file()) == (spec.zo is not None)

    out = tmp_path / "run"
    trainer = Trainer(run_config(tiny_dir, name), out, progress=False)
    real_step = spec.rule.step

    def stopping_step(self, examples, step):  # SIGTERM after step 4, as the signal handler would
        stats = real_step(self, examples, step)
        if step + 1 == 4:
            trainer._stop = signal.SIGTERM
        return stats

    monkeypatch.setattr(spec.rule, "step", stopping_step)
    with pytest.raises(Interrupted):
        trainer.run()
    monkeypatch.setattr(spec.rule, "step", real_step)
    resumed = Trainer(run_config(tiny_dir, name), out, progress=False, resume=True).run()
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["best_dev_accuracy"] == reference["best_dev_accuracy"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("loss") for m in metrics] == [m.get("loss") for m in expected]  # bitwise the same run


def test_unknown_method_names_the_registered_ones(monkeypatch):
    monkeypatch.setitem(METHODS, "sign-peft", MethodSpec(SignDescent, fo="peft"))
    RunConfig(method="sign-peft").validate()
    with pytest.raises(HyftError, match="sign-peft"):
        RunConfig(method="nope").validate()
