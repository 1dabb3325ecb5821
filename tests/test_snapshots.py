"""Resume and restore in bounded time: base snapshots every K updates, so resume, the best-dev restore and
export replay at most K logged updates; checkpoints hold one copy of the trained weights and the resolved
config, and resume refuses any change to it."""

from __future__ import annotations

import json

import pytest
import torch

from hyft.config import RunConfig
from hyft.engine.zo import ZOEngine
from hyft.errors import HyftError
from hyft.methods.zo import ZerothOrder
from hyft.training.loop import Trainer
from tests.conftest import stop_after


def config(tiny_dir: str, **overrides) -> RunConfig:
    values = dict(model=tiny_dir, method="zo-full", task="sst2", num_train=24, num_dev=8, num_test=8, steps=12,
                  batch_size=4, eval_every=4, checkpoint_every=5, snapshot_every=3, lr_zo=1e-3, zero_shot=False)
    return RunConfig(**{**values, **overrides})


def test_resume_replays_at_most_snapshot_every_updates(tiny_dir, tmp_path, monkeypatch):
    reference = Trainer(config(tiny_dir), tmp_path / "ref", progress=False).run()

    out = tmp_path / "run"
    stop_after(monkeypatch, Trainer(config(tiny_dir), out, progress=False), 10)
    kept = sorted(int(f.stem.split("-")[1]) for f in (out / "snapshots").glob("base-*"))
    assert 9 in kept and 6 not in kept  # the checkpoint's floor (and the best-dev step's) are kept

    replayed = []
    real_update = ZOEngine.update
    monkeypatch.setattr(ZOEngine, "update", lambda self, u: replayed.append(u.step) or real_update(self, u))
    at_step = {}
    real_step = ZerothOrder.step
    monkeypatch.setattr(ZerothOrder, "step",
                        lambda self, ex, step: at_step.setdefault(step, len(replayed)) * 0 or real_step(self, ex, step))
    results = Trainer(config(tiny_dir), out, progress=False, resume=True).run()
    assert at_step[10] <= 3  # the rebuild at resume: snapshot 9 + 1 logged update
    assert results["test_accuracy"] == reference["test_accuracy"]
    assert (out / "zo_log.jsonl").read_text() == (tmp_path / "ref" / "zo_log.jsonl").read_text()
    restore = len(replayed) - at_step[11] - 1  # after the last step's own update: the best-dev restore
    assert restore <= 3 and results["zo_log_best_index"] < 12


def test_edited_config_is_refused_on_resume(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    stop_after(monkeypatch, Trainer(config(tiny_dir), out, progress=False), 1)
    text = (out / "config.yaml").read_text().replace("lr_zo: 0.001", "lr_zo: 0.01")
    (out / "config.yaml").write_text(text)
    edited = RunConfig.from_yaml(out / "config.yaml")
    with pytest.raises(HyftError, match=r"differs from the checkpoint's \(lr_zo: 0.001 -> 0.01\)"):
        Trainer(edited, out, progress=False, resume=True).run()


def test_fo_full_checkpoint_holds_one_copy_of_the_weights(tiny_dir, tmp_path):
    out = tmp_path / "fo"
    Trainer(config(tiny_dir, method="fo-full", lr_fo=1e-3, steps=4), out, progress=False).run()
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    tensors = sum(v.numel() for v in ckpt["direct"].values())
    model_numel = json.loads((out / "results.json").read_text())["trainable_fo"]
    assert tensors == model_numel
    assert isinstance(ckpt["state"].best.weights, str)  # the best-dev copy lives in its own file
    assert (out / ckpt["state"].best.weights).is_file()
    assert len(list(out.glob("best-*.safetensors"))) == 1


def test_logs_of_another_scheme_are_refused_and_other_devices_noted(tiny_dir, tmp_path, capsys):
    """A log written with an earlier direction scheme is refused in one line (never replayed wrongly); one
    written on another device kind replays with a note on the tolerance."""
    from hyft.cli import main

    out = tmp_path / "run"
    Trainer(config(tiny_dir, steps=4, zo_dist="gaussian"), out, progress=False).run()  # the note is for Gaussian z
    log = out / "zo_log.jsonl"
    lines = log.read_text().splitlines()
    header = json.loads(lines[0])

    header["header"]["device"] = "cuda"
    log.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    notes = []
    from hyft.tools.replay import replay

    replay(tiny_dir, log, upto=2, log=notes.append)
    assert any("written on cuda" in n for n in notes)

    header["header"]["scheme"] = "chunked-v2"
    log.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    capsys.readouterr()
    assert main(["replay", "--model", tiny_dir, "--log", str(log), "--out", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "chunked-v2" in err and "counter-v3" in err and "\n" not in err
