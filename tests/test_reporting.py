"""--report-to: the metrics rows reach TensorBoard event files unchanged; a missing library or unknown
destination is a one-line error."""

from __future__ import annotations

import json

import pytest

from hyft.config import RunConfig
from hyft.errors import HyftError
from hyft.training.loop import Trainer
from hyft.training.reporting import reporter


def test_tensorboard_events_hold_the_metrics_rows(tiny_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = RunConfig(model=tiny_dir, method="hybrid", task="sst2", num_train=16, num_dev=8, num_test=8, steps=4,
                       batch_size=4, eval_every=2, zero_shot=False, report_to="tensorboard")
    Trainer(config, tmp_path / "run", progress=False).run()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "zo_coef", "dev_accuracy"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 events


def test_unknown_destination_is_refused(tmp_path):
    with pytest.raises(HyftError, match="report_to must be"):
        RunConfig(report_to="mlflow").validate()
    with pytest.raises(HyftError, match="unknown --report-to"):
        reporter("mlflow", tmp_path, {})
